"""The Pallas (Triton) kernels of a program, built for an H100 on any machine, no GPU needed.

JAX lowers a Pallas kernel to Triton IR inside a custom call (for an abstract GPU device, on a CPU too),
and a GPU's compile then runs Triton's own passes (layouts, dot operands, software pipelining) and ptxas.
Lowering alone cannot tell whether a kernel builds, how many registers it takes, or whether it spills.
`build` runs those steps here with the `triton` package (a test dependency; XLA builds with its own copy
of Triton, so a GPU's build can differ in detail) and reads ptxas's report. tests/test_gpu_lowering.py
builds every kernel; `python bench/kernel_build.py` prints the paged kernel's forms.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import jax
import triton
from jaxlib.mlir import ir
from jaxlib.triton import dialect as triton_dialect
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas

TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call target of a Pallas Triton kernel
# An H100 SM (sm_90): 64K registers, allocated a warp at a time in units of 256; 228 KB of shared memory, of
# which the hardware keeps 1 KB a resident program; at most 64 warps and 32 programs.
SM_REGISTERS, SM_SHARED, SM_WARPS, SM_PROGRAMS = 65536, 228 * 1024, 64, 32
H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas kernel of a lowered program: its Triton IR (text) and launch settings."""

    name: str
    ir: str
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class Build:
    """A kernel built for sm_90: its PTX and SASS, and what ptxas reports."""

    ptx: str
    sass: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    num_warps: int

    def programs_per_sm(self) -> int:
        """How many of its programs an SM holds at once, as registers, shared memory and warps allow."""
        registers = -(-self.registers * 32 // 256) * 256 * self.num_warps  # a program's, in whole units
        shared = self.shared_bytes + 1024
        return min(SM_REGISTERS // registers, SM_SHARED // shared, SM_WARPS // self.num_warps, SM_PROGRAMS)

    def count(self, pattern: str) -> int:
        """How many SASS instructions match `pattern` (a regex on the opcode, e.g. "HMMA|HGMMA", "LDGSTS")."""
        return sum(1 for op in _opcodes(self.sass) if re.match(pattern, op))

    def loop_instructions(self) -> int:
        """The SASS instructions of the longest loop (a backward branch's span): a loop step's work a warp;
        0 for a kernel without a loop."""
        lines = self.sass.splitlines()
        labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
        spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
                 if (m := re.search(r"BRA `\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i]
        longest = max((len(_opcodes("\n".join(lines[first:last + 1]))) for first, last in spans), default=0)
        return longest if longest > 1 else 0  # a lone `BRA` to itself is the end of the code, not a loop


def _opcodes(sass: str) -> list[str]:
    return re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)", sass)


def lower(fn, *args, device: jax.sharding.AbstractDevice = H100, axes: tuple[str, ...] = ("device",)
          ) -> jax.stages.Lowered:
    """fn(*args) (ShapeDtypeStructs: nothing is allocated) lowered for one abstract GPU, as a mesh of one
    device along each of `axes` (a model's programs name the project's mesh axes)."""
    mesh = jax.sharding.AbstractMesh((1,) * len(axes), axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes),
                                     abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def kernels(program: jax.stages.Lowered) -> list[Kernel]:
    """The Triton kernels a lowered program calls, in program order."""
    found = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    child = child.operation
                    if (child.name == "stablehlo.custom_call"
                            and ir.StringAttr(child.attributes["call_target_name"]).value == TRITON_CALL):
                        found.append(child.attributes["mhlo.backend_config"])
                    visit(child)

    visit(program.compiler_ir().operation)
    context = ir.Context()
    triton_dialect.register_dialect(context)
    with context, ir.Location.unknown():  # the call holds MLIR bytecode; triton.compile reads text
        return [Kernel(name=ir.StringAttr(config["name"]).value,
                       ir=ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm(
                           enable_debug_info=False),
                       num_warps=ir.IntegerAttr(config["num_warps"]).value,
                       num_stages=ir.IntegerAttr(config["num_stages"]).value) for config in found]


def build(kernel: Kernel, capability: int = 90) -> Build:
    """`kernel` built for an sm_`capability` GPU: Triton's passes to PTX, ptxas to a cubin, its SASS."""
    ptxas = get_ptxas(capability).path
    nvdisasm = str(Path(ptxas).with_name("nvdisasm"))
    arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        source, ptx, cubin = (Path(tmp) / f"{kernel.name}.{ext}" for ext in ("ttir", "ptx", "cubin"))
        source.write_text(kernel.ir)
        built = triton.compile(str(source), target=GPUTarget("cuda", capability, 32),
                               options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages))
        ptx.write_text(built.asm["ptx"])
        report = subprocess.run([ptxas, f"-arch={arch}", "-v", str(ptx), "-o", str(cubin)], capture_output=True,
                                text=True, check=True).stderr
        sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    return Build(ptx=built.asm["ptx"], sass=sass,
                 registers=int(re.search(r"Used (\d+) registers", report).group(1)),
                 spill_bytes=sum(map(int, re.findall(r"(\d+) bytes spill", report))),
                 shared_bytes=built.metadata.shared, num_warps=kernel.num_warps)
