"""The kernel policy: which implementation runs each op, as one explicit, hashable value.

    kernels = Kernels.auto(mesh)     # derived once, from the devices the call runs on
    kernels = Kernels.xla()          # XLA everywhere: the reference every kernel is tested against
    logits = forward(params, tokens, cfg, kernels=kernels)

The model and the loops around it pass this value down; no op looks at global device state or the
environment to choose. `auto` decides from the devices it is given (a mesh's, or the first local
device), so a one-device run on a many-GPU host still gets the one-GPU kernels, and a sharded run never
gets a kernel that cannot be partitioned. It is a frozen dataclass, so it is a static argument of jit.

Fields and their choices (the first is always the XLA reference):
  attention         causal attention over whole rows (training, prefill): "xla" | "cudnn" (GPUs) |
                    "splash" (TPUs, Splash attention)
  masked_attention  causal attention within segments (packed rows): "xla" | "pallas" (GPUs: our flash
                    kernel, pallas_flash_attention.py) | "splash" (TPUs)
  decode_attention  a decode step's rotary, cache write and attention: "xla" | "pallas" (one GPU)
  paged_attention   a decode step's attention over the serving engine's paged KV cache: "xla" |
                    "pallas" (one GPU: pallas_paged_attention.py reads the blocks where they lie; its
                    loop as tensor-core dots where query heads share kv heads, else on the vector units) |
                    "pallas_dots" (the dot form for every model: slower without grouped heads)
  matmul            few-row matmuls of quantized weights and of stacked bf16 weights read in place:
                    "xla" | "pallas" (one GPU; Triton) | "native" (the CPU's C++ kernel, float32)
  matvec            one-row matmuls and the whole decode layer in one call: "xla" | "cuda" (one
                    Hopper GPU, its library built with nvcc)
  stacked_weights   bf16 weights a few-row decode step reads from the layer stack through the matmul
                    kernel instead of XLA's slice-then-dot ("o": XLA copies that slice before cuBLAS)
  decode_unroll     unroll the decode step's layer scan (accelerators: a rolled scan copies each layer's
                    weights; on CPU the unrolled program compiles slowly and runs slower)
  cache_layout      the KV cache's order in memory (KVCache.k and .v, major to minor) that prefill and
                    the on-device decode loop both use; () leaves it to the compiler. TPUs: (0, 1, 3, 2, 4),
                    each kv head's slots together: XLA:TPU picks that order for prefill and another for
                    the decode step, and copies both caches between them (bench/BENCHMARKS.md)
  interpret         run the Pallas kernels in Pallas' interpreter (how the CPU tests run GPU and TPU kernels)

Under a mesh the Pallas attention kernels run on each device's shard (sharded.py); cuDNN's partitions
through XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from llama_jax.ops import cpu_qmatmul, cuda_matvec

CHOICES = {
    "attention": ("xla", "cudnn", "splash"),
    "masked_attention": ("xla", "pallas", "splash"),
    "decode_attention": ("xla", "pallas"),
    "paged_attention": ("xla", "pallas", "pallas_dots"),
    "matmul": ("xla", "pallas", "native"),
    "matvec": ("xla", "cuda"),
}
NAMES = ("auto", "xla")  # what --kernels takes
TPU_CACHE_LAYOUT = (0, 1, 3, 2, 4)  # [layers, batch, kv_heads, slots, head_dim] in memory
STACKED_WEIGHTS = ("q", "k", "v", "o", "gate", "up", "down")  # every projection of a layer


@dataclasses.dataclass(frozen=True)
class Kernels:
    attention: str = "xla"
    masked_attention: str = "xla"
    decode_attention: str = "xla"
    paged_attention: str = "xla"
    matmul: str = "xla"
    matvec: str = "xla"
    stacked_weights: tuple[str, ...] = ()
    decode_unroll: bool = False
    cache_layout: tuple[int, ...] = ()
    interpret: bool = False

    def __post_init__(self):
        for field, allowed in CHOICES.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"Kernels.{field}={getattr(self, field)!r}: expected one of {', '.join(allowed)}")
        if self.cache_layout and sorted(self.cache_layout) != list(range(5)):
            raise ValueError(f"Kernels.cache_layout={self.cache_layout!r}: expected an order of the cache's five axes")

    @classmethod
    def xla(cls) -> "Kernels":
        return cls()

    @classmethod
    def auto(cls, mesh: jax.sharding.Mesh | None = None,
             devices: Sequence[jax.Device] | None = None) -> "Kernels":
        """The fastest kernels for the devices a call runs on: `mesh`'s, else `devices`, else the first
        local device. Builds (once, cached on disk) the native libraries it chooses; one that cannot be
        built is not chosen, with one warning saying why."""
        if mesh is not None:
            devices = list(mesh.devices.flat)
        devices = list(devices or jax.local_devices()[:1])
        platform = devices[0].platform
        one = len(devices) == 1
        if platform == "gpu":
            hopper = one and cuda_matvec.is_hopper(devices[0]) and cuda_matvec.available(devices[0])
            return cls(attention="cudnn", masked_attention="pallas", decode_attention="pallas" if one else "xla",
                       paged_attention="pallas" if one else "xla",
                       matmul="pallas" if one else "xla", matvec="cuda" if hopper else "xla",
                       stacked_weights=("o",) if one else (), decode_unroll=True)
        if platform == "cpu":
            return cls(matmul="native" if one and cpu_qmatmul.available() else "xla")
        return cls(attention="splash", masked_attention="splash", decode_unroll=True,  # TPU
                   cache_layout=TPU_CACHE_LAYOUT)

    def in_device_loop(self) -> "Kernels":
        """The policy for a decode step inside `lax.while_loop` (generate.decode_loop): where the Pallas
        matmul serves, it reads every stacked bf16 weight in place. XLA's GEMMs are the faster step
        dispatched alone, but inside a while loop XLA copies each layer's weight slice out of the stack
        every iteration instead of fusing the slice into its GEMM (bench/BENCHMARKS.md)."""
        if self.matmul != "pallas" or not self.stacked_weights:
            return self
        return dataclasses.replace(self, stacked_weights=STACKED_WEIGHTS)

    @classmethod
    def named(cls, name: str, mesh: jax.sharding.Mesh | None = None) -> "Kernels":
        """`--kernels NAME`: "auto" (Kernels.auto for `mesh`) or "xla"."""
        if name == "auto":
            return cls.auto(mesh)
        if name == "xla":
            return cls.xla()
        raise ValueError(f"--kernels {name!r}: expected one of {', '.join(NAMES)}")

    def describe(self) -> str:
        return ", ".join(f"{f}={getattr(self, f)}" for f in CHOICES)
