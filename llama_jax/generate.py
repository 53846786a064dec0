"""Autoregressive decoding with a KV cache: prefill, decode step, samplers, and two runners.

    out = generate(model, ["Once upon a time", ""], max_new_tokens=64, temperature=0.8, top_p=0.9)
    for piece in stream(model, "Hello"):       # text as it is produced
        print(piece, end="", flush=True)
    ids = generate_tokens(params, cfg, prompt_ids, max_new_tokens=128)   # arrays in, arrays out

A batch of prompts of different lengths is left-padded to one length P. Every row shares cache
slot numbers (slot s holds token s of the padded batch); padding is masked out of attention and
each row's real tokens get rotary positions 0, 1, ... so a row decodes exactly as it would alone.
The cache holds at least P + max_new_tokens slots.

Runners:
- `generate_tokens` (`decode_loop` on arrays): prefill then a `lax.while_loop` of decode steps,
  all in one jitted call (no host round trip per token); stops early once every row has produced EOS.
- `stream_tokens` / `stream`: jitted prefill and decode step called from Python, yielding each
  token as it comes (chat), read once the next step is dispatched so that the device never waits for
  the caller. The cache buffers are donated to each call, so XLA updates them in place.
Both draw the sample for step t from fold_in(key(seed), t), so they give the same tokens.

Which kernels run the model is the kernel policy's (ops/policy.py): `kernels=None` takes
`Kernels.auto(mesh)` once, at the entry point, and passes it down. It also says whether the decode step
runs the layer scan unrolled (accelerators: decode is memory-bound, and a rolled scan copies each
layer's weight slice; bench/BENCHMARKS.md) or rolled (CPU, where the unrolled program compiles slowly).
Inside `decode_loop` the step runs under `kernels.in_device_loop()`, which reads in place every stacked
weight a kernel can take, and the cache keeps the order in memory `Kernels.cache_layout` names (TPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.layout import Format, Layout, with_layout_constraint

from llama_jax.config import LlamaConfig
from llama_jax.model import CACHE_AXES, KVCache, apply
from llama_jax.ops import Kernels
from llama_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


# ---------------------------------------------------------------------------------------------
# Samplers


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits [..., vocab] with every token outside the top-k / nucleus set to -inf.

    top_k: keep the k largest logits. top_p: keep the smallest set of most probable tokens whose
    probabilities sum to at least top_p (the most probable token is always kept)."""
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more probable tokens
        keep = before < top_p  # token i is needed while the ones above it do not reach top_p yet
        # The smallest kept logit: everything at or above it stays.
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits float32 [batch, vocab] -> token ids int32 [batch]. Temperature first, then top-k,
    then top-p (transformers' order)."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling.top_k, sampling.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Prefill and decode step (pure; jitted below and inside the on-device loop)


def _shard_cache(cache: KVCache) -> KVCache:
    # Under a mesh (jax.set_mesh), the cache follows the same logical-axis rules as the model:
    # batch over (data, fsdp), kv_heads over tensor. A no-op without one.
    return KVCache(constrain(cache.k, CACHE_AXES), constrain(cache.v, CACHE_AXES),
                   constrain(cache.valid, ("batch", "cache_seq")), cache.index)


def _prefill(params, tokens, mask, cache, cfg, kernels):
    """tokens, mask [batch, P] (left-padded; mask False on padding) -> logits [batch, vocab] of each
    row's last token, the cache filled at slots 0..P-1, and each row's next position [batch]."""
    cache = _shard_cache(cache)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # real tokens: 0, 1, ...
    logits, cache = apply(params, tokens, cfg, positions=positions, cache=cache, token_mask=mask, kernels=kernels)
    return logits[:, -1], cache, mask.sum(axis=1).astype(jnp.int32)


def next_logits(params, token, position, cache, cfg, kernels):
    """token, position [batch] -> logits [batch, vocab] for the next token, cache one slot fuller."""
    logits, cache = apply(params, token[:, None], cfg, positions=position[:, None], cache=cache,
                          unroll=True if kernels.decode_unroll else 1, kernels=kernels)
    return logits[:, 0], cache


prefill = jax.jit(_prefill, static_argnames=("cfg", "kernels"), donate_argnames=("cache",))
decode_step = jax.jit(next_logits, static_argnames=("cfg", "kernels"), donate_argnames=("cache",))


@functools.partial(jax.jit, static_argnames=("sampling",))
def _sample_jit(logits, key, step, sampling):
    return sample(logits, jax.random.fold_in(key, step), sampling)


def _pinned(cache: KVCache, kernels: Kernels) -> KVCache:
    """The cache's keys and values held in the policy's memory order (Kernels.cache_layout), where it names
    one: prefill and the decode loop then agree on it, and XLA copies neither cache between them."""
    if not kernels.cache_layout:
        return cache
    layout = Layout(kernels.cache_layout)
    return dataclasses.replace(cache, k=with_layout_constraint(cache.k, layout),
                               v=with_layout_constraint(cache.v, layout))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "cache_len", "kernels",
                                             "cache_dtype"))
def decode_loop(params, tokens, mask, key, eos_id, cfg: LlamaConfig, max_new_tokens: int,
                sampling: Sampling = Sampling(), cache_len: int | None = None, kernels: Kernels = Kernels(),
                cache_dtype: str | None = None):
    """The on-device runner, arrays in and out (what a benchmark times):
    tokens int32, mask bool [batch, P] (left-padded), key (jax.random.key), eos_id int32 scalar (-1:
    never stop early) -> new tokens int32 [batch, max_new_tokens] (eos_id after a row's EOS) and each
    row's count of generated tokens before its EOS [batch]. The loop ends when every row is done.
    cache_dtype: the KV cache's dtype (default the compute dtype; "float8_e4m3fn" halves a bf16 cache,
    each key and value rounded to 8 bits as it is written)."""
    batch, P = tokens.shape
    cache = KVCache.zeros(cfg, batch, cache_len or P + max_new_tokens, dtype=cache_dtype)
    logits, cache, position = _prefill(params, tokens, mask, cache, cfg, kernels)
    cache = _pinned(cache, kernels)
    kernels = kernels.in_device_loop()
    out = jnp.full((batch, max_new_tokens), eos_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def pick(step, logits, done, out):  # sample token `step`; finished rows repeat eos_id
        token = sample(logits, jax.random.fold_in(key, step), sampling)
        token = jnp.where(done, eos_id, token)
        out = jax.lax.dynamic_update_index_in_dim(out, token, step, axis=1)
        return token, done | (token == eos_id), out

    def cond(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens - 1) & ~jnp.all(done)

    def body(carry):
        step, logits, cache, position, done, out = carry
        token, done, out = pick(step, logits, done, out)
        logits, cache = next_logits(params, token, position, cache, cfg, kernels)
        return step + 1, logits, _pinned(cache, kernels), position + 1, done, out

    init = (jnp.zeros((), jnp.int32), logits, cache, position, done, out)
    step, logits, _, _, done, out = jax.lax.while_loop(cond, body, init)
    _, _, out = pick(step, logits, done, out)  # the last token needs no forward pass after it
    lengths = jnp.argmax(jnp.concatenate([out == eos_id, jnp.ones((batch, 1), bool)], axis=1), axis=1)
    return out, lengths


def compile_decode_loop(params, cfg: LlamaConfig, batch: int, prompt_len: int, max_new_tokens: int, *,
                        sampling: Sampling = Sampling(), cache_len: int | None = None, kernels: Kernels = Kernels(),
                        cache_dtype: str | None = None, device: jax.Device | None = None) -> jax.stages.Compiled:
    """`decode_loop` compiled ahead of time for prompts [batch, prompt_len] on one device (default the first
    local one; a topology's device compiles for a TPU that is not here), with the params in the layout the
    compiled program picks (Layout.AUTO) rather than row-major. On a TPU chip that drops XLA's relaid copies
    of the stacked q/k/v weights (3 GiB for Llama-2-7B; bench/BENCHMARKS.md). params: arrays or
    ShapeDtypeStructs (only shapes and dtypes are read). Place the params once in the layouts it asks for,
    then call it as often as wanted:

        loop = compile_decode_loop(params, cfg, 8, 16, 1008, kernels=Kernels.auto(), cache_dtype="float8_e4m3fn")
        params = jax.device_put(params, loop.input_formats[0][0])
        tokens, lengths = loop(params, tokens, mask, jax.random.key(0), jnp.int32(eos_id))
    """
    on_device = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device), params)
    formats = jax.tree.map(lambda _: Format(Layout.AUTO, on_device), abstract)
    run = functools.partial(decode_loop, cfg=cfg, max_new_tokens=max_new_tokens, sampling=sampling,
                            cache_len=cache_len, kernels=kernels, cache_dtype=check_cache_dtype(cache_dtype))
    loop = jax.jit(run, in_shardings=(formats,) + (on_device,) * 4)
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=on_device)
    mask = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=on_device)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=on_device)
    eos = jax.ShapeDtypeStruct((), jnp.int32, sharding=on_device)
    return loop.lower(abstract, prompt, mask, key, eos).compile()


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "kernels"), donate_argnames=("cache",))
def _pick_and_step(params, logits, key, step, position, cache, done, eos_id, cfg, sampling, kernels):
    """decode_loop's body as one jitted call: sample token `step` (eos_id for finished rows), then
    run it through the model."""
    token = jnp.where(done, eos_id, sample(logits, jax.random.fold_in(key, step), sampling))
    done = done | (token == eos_id)
    logits, cache = next_logits(params, token, position, cache, cfg, kernels)
    return token, logits, cache, position + 1, done


def decode_host_loop(params, tokens, mask, key, eos_id, cfg: LlamaConfig, max_new_tokens: int,
                     sampling: Sampling = Sampling(), cache_len: int | None = None, kernels: Kernels = Kernels(),
                     cache_dtype: str | None = None, check_every: int = 16):
    """decode_loop's steps dispatched one by one from Python, with the same arguments and results.
    Dispatch is asynchronous, so the device never waits on the host; the host asks whether every
    row is done only every `check_every` steps. On one GPU each step keeps XLA's GEMMs, which read a
    layer's weight slice in place when the step is dispatched alone; `decode_loop` reads them through
    the Pallas matmul instead (Kernels.in_device_loop), 4.5% slower at batch 16 and 9% at batch 64 on
    an H100 (bench/BENCHMARKS.md)."""
    batch, P = tokens.shape
    cache = KVCache.zeros(cfg, batch, cache_len or P + max_new_tokens, dtype=cache_dtype)
    logits, cache, position = prefill(params, tokens, mask, cache, cfg=cfg, kernels=kernels)
    done = jnp.zeros((batch,), bool)
    out = []
    for step in range(max_new_tokens - 1):
        token, logits, cache, position, done = _pick_and_step(
            params, logits, key, step, position, cache, done, eos_id, cfg=cfg, sampling=sampling, kernels=kernels)
        out.append(token)
        if step % check_every == check_every - 1 and bool(jnp.all(done)):
            break
    else:  # the last token needs no forward pass after it
        out.append(jnp.where(done, eos_id, _sample_jit(logits, key, max_new_tokens - 1, sampling)))
    out = jnp.stack(out, axis=1)
    out = jnp.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])), constant_values=eos_id)
    lengths = jnp.argmax(jnp.concatenate([out == eos_id, jnp.ones((batch, 1), bool)], axis=1), axis=1)
    return out, lengths


def throughput_runner(kernels: Kernels):
    """The faster of the two runners where `kernels` run (measured: bench/BENCHMARKS.md): on a GPU
    (cuDNN attention chosen) the host loop, elsewhere the on-device loop."""
    return decode_host_loop if kernels.attention == "cudnn" else decode_loop


# ---------------------------------------------------------------------------------------------
# Batching and checks


def _bucket(n: int) -> int:
    # Shapes are rounded up so that nearby lengths share a compiled program: multiples of 8 up to
    # 64, then powers of two (left padding is masked, so it costs compute, never correctness).
    return max(8, -(-n // 8) * 8) if n <= 64 else 1 << (n - 1).bit_length()


def _cache_len(P: int, max_new_tokens: int) -> int:
    # Cache slots (not positions: those are checked against the context) in steps of 128, so a chat's
    # turns of different lengths reuse one compiled decode step.
    return -(-(P + max_new_tokens) // 128) * 128


def pad_left(prompts: Sequence[Sequence[int]]):
    """Left-pad token lists to one bucketed length -> tokens int32 [batch, P], mask bool [batch, P]."""
    P = _bucket(max(len(p) for p in prompts))
    tokens = np.zeros((len(prompts), P), np.int32)
    mask = np.zeros((len(prompts), P), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, P - len(p):] = p
            mask[i, P - len(p):] = True
    return tokens, mask


def _check(cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not len(prompts):
        raise ValueError("no prompts given")
    for i, p in enumerate(prompts):
        if not len(p):
            raise ValueError(f"prompt {i} has no tokens (start from BOS at least)")
        if min(p) < 0 or max(p) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{len(p) + max_new_tokens}, more than the model's context of {cfg.max_seq_len} tokens")


def check_cache_dtype(name: str | None) -> str | None:
    """A KV cache dtype by name, checked: a float type (keys and values are rounded into it as written)."""
    if name is None:
        return None
    try:
        dtype = jnp.dtype(name)
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"cache_dtype {name!r}: expected a float dtype, e.g. 'bfloat16' or 'float8_e4m3fn'")
    return dtype.name


def _on(mesh):
    """The mesh in context for tracing (the model's and the cache's sharding constraints), or nothing."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def generate_tokens(params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eos_id: int | None = None, mesh: jax.sharding.Mesh | None = None,
                    kernels: Kernels | None = None, cache_dtype: str | None = None) -> list[list[int]]:
    """Token ids in, token ids out: each prompt's new tokens, up to (not including) its EOS.
    The whole batch runs through `throughput_runner`: one jitted call (prefill + `lax.while_loop`
    of decode steps), or on GPU the same steps dispatched from Python. With `mesh`
    (params sharded on it, e.g. lj.load(path, mesh=mesh)) activations and cache are sharded by the
    same rules. kernels: the kernel policy (default Kernels.auto(mesh)). cache_dtype: the KV cache's
    float dtype (default the compute dtype; "float8_e4m3fn" holds twice the tokens of a bf16 cache)."""
    kernels = Kernels.auto(mesh) if kernels is None else kernels
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    _check(cfg, prompts, max_new_tokens)
    cache_dtype = check_cache_dtype(cache_dtype)
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    eos = cfg.eos_id if eos_id is None else eos_id
    eos = -1 if eos is None else int(eos)  # -1 never matches: run to max_new_tokens
    tokens, mask = pad_left(prompts)
    with _on(mesh):
        out, lengths = throughput_runner(kernels)(
            params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(seed), jnp.int32(eos), cfg,
            int(max_new_tokens), sampling, _cache_len(tokens.shape[1], max_new_tokens), kernels, cache_dtype)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, :lengths[i]].tolist() for i in range(len(prompts))]


def stream_tokens(params, cfg: LlamaConfig, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, *,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  eos_id: int | None = None, mesh: jax.sharding.Mesh | None = None,
                  kernels: Kernels | None = None, cache_dtype: str | None = None) -> Iterator[np.ndarray]:
    """Yields each step's tokens, int32 [batch] (eos_id for rows already finished), until every
    row has produced EOS or max_new_tokens steps have run. kernels, cache_dtype: as in `generate_tokens`."""
    kernels = Kernels.auto(mesh) if kernels is None else kernels
    sampling = Sampling(float(temperature), int(top_k), float(top_p))
    _check(cfg, prompts, max_new_tokens)
    cache_dtype = check_cache_dtype(cache_dtype)
    eos = cfg.eos_id if eos_id is None else eos_id
    eos = -1 if eos is None else int(eos)
    tokens, mask = pad_left(prompts)
    key = jax.random.key(seed)
    cache = KVCache.zeros(cfg, len(prompts), _cache_len(tokens.shape[1], max_new_tokens), dtype=cache_dtype)
    with _on(mesh):
        logits, cache, position = prefill(params, jnp.asarray(tokens), jnp.asarray(mask), cache, cfg, kernels)
    done = jnp.zeros(len(prompts), bool)
    # Token t is read (and the caller handed it) only once step t + 1 is dispatched: the device samples and
    # runs the next step without waiting for the host. Once every row is done, one dispatched step is dropped.
    ahead = None
    for step in range(max_new_tokens):
        with _on(mesh):
            if step + 1 < max_new_tokens:
                token, logits, cache, position, done = _pick_and_step(
                    params, logits, key, step, position, cache, done, eos, cfg=cfg, sampling=sampling,
                    kernels=kernels)
            else:  # the last token needs no forward pass after it
                token = jnp.where(done, eos, _sample_jit(logits, key, step, sampling))
        if ahead is not None:
            out = np.asarray(ahead)
            yield out
            if (out == eos).all():  # finished rows repeat eos_id
                return
        ahead = token
    yield np.asarray(ahead)


# ---------------------------------------------------------------------------------------------
# Text in, text out


def _encode_prompts(model, prompts: Sequence[str]) -> list[list[int]]:
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer; use generate_tokens with token ids")
    out = []
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"prompts must be strings, got {type(p).__name__}")
        ids = tok.encode(p)
        if not ids:  # an empty prompt starts from BOS alone
            if tok.bos_id is None:
                raise ValueError("empty prompt and the tokenizer has no BOS token to start from")
            ids = [tok.bos_id]
        out.append(ids)
    return out


def _continuation(tok, prompt: list[int], new: list[int]) -> str:
    """The text of `new` as it reads after `prompt`. SentencePiece drops the leading space of a
    text's first word, so "The dog" + [" was"] must be decoded together, then the prompt cut off
    (its last tokens are context enough)."""
    prompt = list(prompt[-16:])
    before = tok.decode(prompt)
    both = tok.decode(prompt + new)
    return both[len(before):] if both.startswith(before) else tok.decode(new)


def _eos(model) -> int | None:
    tok = model.tokenizer
    return tok.eos_id if tok is not None and tok.eos_id is not None else model.config.eos_id


def generate(model, prompts: str | Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
             kernels: Kernels | None = None, cache_dtype: str | None = None) -> list[str]:
    """Generated text (without the prompt) for each prompt. `model` is a `Loaded` (lj.load).
    cache_dtype: as in `generate_tokens`."""
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = _encode_prompts(model, prompts)
    out = generate_tokens(model.params, model.config, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed, eos_id=_eos(model), mesh=mesh, kernels=kernels,
                          cache_dtype=cache_dtype)
    return [_continuation(model.tokenizer, p, row) for p, row in zip(ids, out)]


def stream(model, prompt: str | Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, mesh: jax.sharding.Mesh | None = None,
           kernels: Kernels | None = None, cache_dtype: str | None = None) -> Iterator[str]:
    """Yields the text of one prompt (a string, or token ids) piece by piece as tokens arrive.
    Text is released only once it is whole: a character split across byte tokens waits for
    its last byte. cache_dtype: as in `generate_tokens`."""
    ids = list(prompt) if not isinstance(prompt, str) else _encode_prompts(model, [prompt])[0]
    eos = _eos(model)
    new: list[int] = []
    shown = ""
    for token in stream_tokens(model.params, model.config, [ids], max_new_tokens, temperature=temperature,
                               top_k=top_k, top_p=top_p, seed=seed, eos_id=eos, mesh=mesh, kernels=kernels,
                               cache_dtype=cache_dtype):
        if int(token[0]) == eos:
            break
        new.append(int(token[0]))
        text = _continuation(model.tokenizer, ids, new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
            continue
        if text.startswith(shown):
            yield text[len(shown):]
            shown = text
    text = _continuation(model.tokenizer, ids, new)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown):]
