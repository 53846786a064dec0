"""Training: the state, the loss, one jitted sharded train step, the optimizer, and the loop.

    optimizer = make_optimizer(lr=3e-4, warmup_steps=100, total_steps=10_000)
    state = init_train_state(cfg, optimizer, jax.random.key(0), mesh)   # params sharded at creation
    step = make_train_step(cfg, optimizer, mesh, accum_steps=4, remat="full")
    batch = place_batch({"tokens": rows}, mesh)   # int32 [batch, seq + 1]; see `loss_sums` for the rest
    state, metrics = step(state, batch)           # loss, grad_norm, lr, tokens, skipped, nonfinite_streak

A batch is a dict of arrays with a leading batch dimension:
    tokens       int32 [B, S+1]  the model reads tokens[:, :-1] and predicts tokens[:, 1:]
    targets      int32 [B, S]    optional: explicit targets; tokens are then the inputs, [B, S]
    loss_mask    [B, S]          optional: 1 where the target tokens[:, t+1] counts (default: all)
    segment_ids  int32 [B, S]    optional: packed documents; attention stays inside one segment
    positions    int32 [B, S]    optional: rotary positions (restart at each document when packed)
The loss is the mean cross-entropy over the counted targets of the whole batch (all micro-batches).

Numerics: params stay float32 (the master copy) and the optimizer updates them in float32. The step
casts the weight matrices to cfg.compute_dtype (bfloat16) once, for the matmuls, and differentiates
those copies, so their gradients arrive in bfloat16 (the precision the matmuls produce them in) and the
update upcasts them; RMSNorm gains stay float32 throughout. Logits and the loss are float32, computed
a chunk of the sequence at a time, so [batch, seq, vocab] float32 never exists for large vocabularies.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import lora as lora_lib
from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.model import (
    REMAT_POLICIES,
    abstract_params,
    apply,
    init_params,
    param_count,
)
from llama_jax.ops import Kernels
from llama_jax.quantize import quantize_params
from llama_jax.params import BY_PATH
from llama_jax.sharding import place_batch  # noqa: F401  (re-exported: train.place_batch)

# Dense bfloat16 peaks per chip, TFLOP/s (vendor figures): the MFU denominator. Keys are prefixes of
# jax.Device.device_kind; the longest match wins ("TPU v5 lite" is a v5e, "TPU v5" a v5p).
PEAK_TFLOPS = {
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,  # v5e
    "TPU v5e": 197.0,
    "TPU v5": 459.0,  # v5p
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,  # v6e (Trillium)
    "TPU v6e": 918.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
}
H100_BF16_PEAK_FLOPS = PEAK_TFLOPS["NVIDIA H100"] * 1e12


# ---------------------------------------------------------------------------------------------
# State


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any  # float32 master params (the model's params layout), or with LoRA the adapters (lora.py)
    opt_state: Any  # optax state; moments laid out (and sharded) like params
    step: jax.Array  # int32: optimizer updates applied so far (skipped steps not counted)
    rng: jax.Array  # uint32 raw key data; step k's randomness is fold_in(wrap_key_data(rng), k)
    skipped: jax.Array  # int32: steps skipped so far because their gradients were not finite
    nonfinite_streak: jax.Array  # int32: consecutive such steps right now (0 after a good step)


def _is_params_like(tree_def):
    def check(x):
        try:
            return jax.tree.structure(x) == tree_def
        except Exception:  # noqa: BLE001 - leaves of foreign types
            return False
    return check


def trained_abstract(cfg: LlamaConfig, lora: lora_lib.LoraConfig | None = None):
    """Shapes of what the optimizer trains: the params, or with `lora` the adapters."""
    return abstract_params(cfg) if lora is None else lora_lib.abstract_adapters(cfg, lora)


def state_shardings(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh, rules=None,
                    lora: lora_lib.LoraConfig | None = None) -> TrainState:
    """NamedShardings of every leaf of a TrainState: params (or adapters) by the rules; inside the
    optimizer state, every subtree laid out like them (adam's mu and nu) sharded like them; scalars
    replicated."""
    p_shard = (sharding.param_shardings(cfg, mesh, rules) if lora is None
               else lora_lib.adapter_shardings(cfg, lora, mesh, rules))
    abstract = trained_abstract(cfg, lora)
    opt_abstract = jax.eval_shape(optimizer.init, abstract)
    replicated = NamedSharding(mesh, PartitionSpec())
    like = _is_params_like(jax.tree.structure(abstract))
    opt_shard = jax.tree.map(lambda x: p_shard if like(x) else replicated, opt_abstract, is_leaf=like)
    return TrainState(params=p_shard, opt_state=opt_shard, step=replicated, rng=replicated,
                      skipped=replicated, nonfinite_streak=replicated)


def init_train_state(cfg: LlamaConfig, optimizer: optax.GradientTransformation, key: jax.Array, mesh=None,
                     params=None, rules=None, lora: lora_lib.LoraConfig | None = None) -> TrainState:
    """A fresh TrainState: `params` (e.g. a loaded checkpoint's, cast to cfg.param_dtype) or random ones
    from `key`; with `lora`, fresh adapters (the base is not part of the state). Each device creates
    only its shards when a mesh is given."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = jnp.asarray(key, jnp.uint32)
    shard = state_shardings(cfg, optimizer, mesh, rules, lora) if mesh is not None else None
    if lora is not None and params is None:
        params = lora_lib.init_adapters(cfg, lora, jax.random.wrap_key_data(key), mesh, rules)
    elif params is None:
        params = init_params(cfg, jax.random.wrap_key_data(key), mesh, rules=rules)
    else:  # a copy in the param dtype, on the mesh: the step donates the state, never the caller's arrays
        if shard is not None:
            params = jax.device_put(params, shard.params)
        params = jax.tree.map(lambda x: jnp.array(x, dtype=cfg.param_jnp_dtype, copy=True), params)
    opt_state = jax.jit(optimizer.init, out_shardings=shard.opt_state if shard else None)(params)

    def zero():  # a buffer each: donation rejects one buffer passed twice
        return jnp.zeros((), jnp.int32)

    rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(key), 1))
    state = TrainState(params, opt_state, zero(), rng, zero(), zero())
    if shard is not None:
        state = dataclasses.replace(state, **{f: jax.device_put(getattr(state, f), getattr(shard, f))
                                              for f in ("step", "rng", "skipped", "nonfinite_streak")})
    return state


# ---------------------------------------------------------------------------------------------
# Optimizer


def _matrices(params):
    # True for every weight matrix, False for the RMSNorm gains: the parameter table's `decay`. AdamW's
    # decoupled weight decay applies to the matrices only, and the train step differentiates them in the
    # compute dtype. Adapters (a path ending in a LoRA target's "a" or "b") are matrices.
    def keep(path, _):
        names = tuple(k.key for k in path)
        row = BY_PATH.get(names)
        return row.decay if row is not None else names[-1] in ("a", "b")
    return jax.tree_util.tree_map_with_path(keep, params)


def _matrices_in_compute_dtype(params, cfg: LlamaConfig):
    return jax.tree.map(lambda p, m: p.astype(cfg.compute_jnp_dtype) if m else p, params, _matrices(params))


def base_for_training(params, cfg: LlamaConfig, quantize_bits: int | None = None, mesh=None, rules=None):
    """A frozen base for LoRA: the weight matrices in the compute dtype (they are only read), or with
    `quantize_bits` as QArrays: 4, QLoRA's NF4 in groups of 64 (bench/qlora_formats.py: it costs less
    perplexity than int4 with zero points, in fewer bits), or 8, int8 groups of 64; the norms as they
    are. Placed by the sharding rules on `mesh`."""
    base = _matrices_in_compute_dtype(params, cfg)
    if quantize_bits:
        base = quantize_params(base, cfg, bits=quantize_bits, group=64,
                               codebook="nf4" if quantize_bits == 4 else None)
    if mesh is not None:
        base = jax.device_put(base, sharding.param_shardings(cfg, mesh, rules, params=base))
    return base


def make_schedule(lr: float = 3e-4, warmup_steps: int = 0, total_steps: int = 1, end_lr: float = 0.0):
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine decay to `end_lr` at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_lr)


def make_optimizer(lr: float = 3e-4, warmup_steps: int = 0, total_steps: int = 1, weight_decay: float = 0.1,
                   clip_norm: float | None = 1.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   end_lr: float = 0.0) -> optax.GradientTransformation:
    """AdamW (LLaMA's b1, b2, weight decay 0.1 by default) with linear warmup + cosine decay, after
    clipping the gradient's global norm to `clip_norm` (None: no clipping). The learning rate lives
    in the optimizer state (inject_hyperparams), so `current_lr(opt_state)` can report it."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
        learning_rate=make_schedule(lr, warmup_steps, total_steps, end_lr), b1=b1, b2=b2, eps=eps,
        weight_decay=weight_decay, mask=_matrices)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adamw) if clip_norm else adamw


def current_lr(opt_state) -> jax.Array:
    """The learning rate the last update used (NaN when the optimizer does not expose one)."""
    lr = optax.tree_utils.tree_get(opt_state, "learning_rate", default=None,
                                   filtering=lambda _, v: isinstance(v, jax.Array))
    return jnp.asarray(jnp.nan if lr is None else lr, jnp.float32)


# ---------------------------------------------------------------------------------------------
# Loss


def auto_loss_chunk(seq: int, vocab: int, rows: int = 1, max_logits: int = 1 << 28) -> int:
    """Sequence positions per loss chunk: the whole sequence when the logits of `rows` rows (a device's
    share of the batch) fit in `max_logits` elements (1 GiB float32), else the largest divisor of `seq`
    that keeps a chunk's logits within it."""
    if rows * seq * vocab <= max_logits:
        return seq
    limit = max(1, max_logits // (rows * vocab))
    return max(c for c in range(1, min(seq, limit) + 1) if seq % c == 0)


@jax.custom_vjp
def head_logits(h: jax.Array, head: jax.Array) -> jax.Array:
    """float32 logits [B, C, V] of hidden states h [B, C, D] and the head [D, V], both in the compute dtype.
    The backward pass rounds the logits' gradient to that dtype first: left float32, it would turn
    both of its matmuls into float32 ones (15 ms of a 197 ms 7B-width step on an H100, against 5 in bf16)."""
    return jnp.einsum("bcd,dv->bcv", h, head, preferred_element_type=jnp.float32)


def _head_logits_fwd(h, head):
    return head_logits(h, head), (h, head)


def _head_logits_bwd(res, g):
    h, head = res
    g = g.astype(h.dtype)
    dh = jnp.einsum("bcv,dv->bcd", g, head, preferred_element_type=jnp.float32)
    dhead = jnp.einsum("bcd,bcv->dv", h, g, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dhead.astype(head.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def scan_logits(params, inputs: jax.Array, cfg: LlamaConfig, step: Callable, init, xs, *, positions=None,
                segment_ids=None, remat: str = "none", loss_chunk: int | None = None, unroll: int | bool = 1,
                kernels: Kernels = Kernels()):
    """The model on `inputs` [B, S], its next-token logits folded into a carry a chunk of the sequence at a
    time: `step(carry, logits, xs_chunk) -> carry`, logits float32 [B, chunk, V] and xs_chunk the same
    chunk of each of `xs` ([B, S, ...] arrays). Returns the last carry.

    With several chunks (a large vocabulary; `auto_loss_chunk`) each is one step of a rematerialised
    scan, so neither the forward nor the backward pass holds more than one chunk of logits. One chunk is
    not rematerialised: the backward pass starts from the loss, so recomputing its logits would save no
    peak memory. `unroll`: layers of the layer scan unrolled (True: all), as in `Llama.__call__`;
    `kernels`: the kernel policy (ops/policy.py)."""
    b, s = inputs.shape
    hidden, _ = apply(params, inputs, cfg, positions=positions, segment_ids=segment_ids, remat=remat,
                      return_hidden=True, unroll=unroll, kernels=kernels)  # [B, S, D] compute dtype
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]  # [D, V]
    head = head.astype(cfg.compute_jnp_dtype)
    mesh = jax.sharding.get_abstract_mesh()
    rows = b if mesh.empty else max(1, b // sharding.batch_shard_count(mesh, sharding.current_rules()))
    chunk = loss_chunk or auto_loss_chunk(s, cfg.vocab_size, rows)
    if s % chunk:
        raise ValueError(f"loss_chunk {chunk} does not divide the sequence length {s}")
    n = s // chunk

    def split(x):  # [B, S, ...] -> [n, B, chunk, ...]: the batch stays the sharded leading axis of a chunk
        return jnp.moveaxis(x.reshape((b, n, chunk) + x.shape[2:]), 1, 0)

    def body(carry, chunk_xs):
        h, rest = chunk_xs  # [B, chunk, D], the chunk of each of xs
        logits = sharding.constrain(head_logits(h, head), ("batch", "seq", "vocab"))
        return step(carry, logits, rest), None

    if n > 1:
        body = jax.checkpoint(body, prevent_cse=False)
    carry, _ = jax.lax.scan(body, init, (split(hidden), jax.tree.map(split, xs)))
    return carry


def loss_sums(params, batch: dict, cfg: LlamaConfig, *, remat: str = "none", loss_chunk: int | None = None,
              unroll: int | bool = 1, kernels: Kernels = Kernels()):
    """(summed cross-entropy over counted targets, number of counted targets), both float32 scalars;
    the logits made a chunk at a time (`scan_logits`)."""
    if "targets" in batch:  # explicit targets: tokens are the inputs, both [B, S]
        inputs, targets = batch["tokens"], batch["targets"]
    else:
        inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]  # [B, S] each
    b, s = inputs.shape
    mask = batch.get("loss_mask")
    mask = jnp.ones((b, s), jnp.float32) if mask is None else mask.astype(jnp.float32)

    def chunk_nll(total, logits, xs):
        t, m = xs  # [B, chunk] each
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, chunk]
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        return total + jnp.sum((lse - target) * m)

    total = scan_logits(params, inputs, cfg, chunk_nll, jnp.zeros((), jnp.float32), (targets, mask),
                        positions=batch.get("positions"), segment_ids=batch.get("segment_ids"), remat=remat,
                        loss_chunk=loss_chunk, unroll=unroll, kernels=kernels)
    return total, jnp.sum(mask)


def loss_fn(params, batch: dict, cfg: LlamaConfig, **kwargs) -> jax.Array:
    """Mean next-token cross-entropy over the counted targets (float32 scalar)."""
    total, count = loss_sums(params, batch, cfg, **kwargs)
    return total / jnp.maximum(count, 1.0)


def cross_entropy(policy, reference, batch: dict, cfg: LlamaConfig, **kwargs):
    """make_train_step's default objective: loss_sums of the params trained (no reference is read)."""
    total, count = loss_sums(policy, batch, cfg, **kwargs)
    return total, count, {}


# ---------------------------------------------------------------------------------------------
# The train step


def _micro_batches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [accum, B / accum, ...], micro-batch k taking rows k, k + accum, k + 2 accum, ...
    The batch is split over the data axes in contiguous blocks; striding keeps every micro-batch
    spread over all of them (a contiguous split would give each micro-batch to a few devices)."""
    def split(x):
        y = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
        y = sharding.constrain(y, ("batch",) + (None,) * (y.ndim - 1))
        return jnp.swapaxes(y, 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(cfg: LlamaConfig, optimizer: optax.GradientTransformation, mesh=None, *, accum_steps: int = 1,
                    remat: str = "none", loss_chunk: int | None = None, unroll: int | bool = 1, rules=None,
                    kernels: Kernels | None = None, lora: lora_lib.LoraConfig | None = None,
                    objective: Callable | None = None):
    """`step(state, batch) -> (state, metrics)`, jitted, the state donated. With `lora`:
    `step(state, batch, base)`, state.params the adapters and `base` the frozen params they adapt
    (base_for_training: float or quantized), read and never differentiated.

    `objective(policy, reference, batch, *, cfg, remat, loss_chunk, unroll, kernels) -> (total, count,
    extra)`: what the step minimises, total / count over the whole batch (default `cross_entropy`; DPO's
    is dpo.objective). `policy`: the params trained (with `lora`, the base with the adapters attached);
    `reference`: the step's `base`, frozen, so with an objective it is `step(state, batch, base)` too
    (with `lora`, the base without its adapters; without, e.g. a copy of the starting params). `extra`:
    float32 sums over the batch, reported in the metrics divided by `count`, as the loss is.

    With a mesh: params and optimizer state sharded by the rules, the batch split over (data, fsdp).
    `accum_steps`: gradients of that many micro-batches (lax.scan) are summed before one update; the
    batch's rows must divide into them. `remat`: none | full | save_matmuls (what the backward pass
    recomputes per layer). `unroll`: layers of the layer scan unrolled (True: all; 1 or False, the
    default: a loop). Unrolled, XLA feeds each layer's gradients straight into the optimizer's update,
    where a loop writes them into a zeroed stacked buffer first (7B width x 8 layers on an H100: 169.5 ms
    a step against 185.9). The loop keeps compile time flat in depth, and memory in check under fsdp:
    unrolled, the plan of a Llama-2-70B step on 64 devices needs 133 GiB a device, against 24.5 GiB.
    A step whose gradients are not finite changes nothing but the `skipped` and `nonfinite_streak`
    counters. Metrics are float32/int32 scalars: loss, grad_norm (before clipping), lr, tokens (counted
    targets), skipped (1 if this step was), nonfinite_streak. `kernels`: the kernel policy (default
    Kernels.auto(mesh))."""
    kernels = Kernels.auto(mesh) if kernels is None else kernels
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {remat!r}")
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}")
    model_objective = functools.partial(objective or cross_entropy, cfg=cfg, remat=remat, loss_chunk=loss_chunk,
                                        unroll=unroll, kernels=kernels)

    def loss(trained, batch, base, key):
        policy = trained if lora is None else lora_lib.attach(base, trained, lora, key)
        total, count, extra = model_objective(policy, base, batch)
        return total, (count, extra)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def gradients(params, batch, base, key):
        # Gradients of the compute-dtype copies: half the bytes of float32 ones, in memory and in the update
        # (7B on two GPUs: 73.9 GB a card at batch 8 against 80.7; 7B width x 8 layers: 3% faster).
        params = _matrices_in_compute_dtype(params, cfg)
        if accum_steps == 1:
            (total, (count, extra)), grads = grad_fn(params, batch, base, key)
            return grads, total, count, extra
        rows = batch["tokens"].shape[0]
        if rows % accum_steps:
            raise ValueError(f"batch of {rows} rows does not split into {accum_steps} micro-batches")

        def body(carry, micro):
            g_sum, l_sum, n_sum = carry
            micro, k = micro
            (total, (count, extra)), g = grad_fn(params, micro, base, k)
            return (jax.tree.map(jnp.add, g_sum, g), l_sum + total, n_sum + count), extra

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        carry = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
        keys = jax.random.key_data(jax.random.split(key, accum_steps))  # a dropout mask each (LoRA)
        (grads, total, count), extra = jax.lax.scan(body, carry, (_micro_batches(batch, accum_steps), keys))
        return grads, total, count, jax.tree.map(lambda x: jnp.sum(x, axis=0), extra)

    def step(state: TrainState, batch: dict, base=None):
        # Gradients of the summed loss, divided once by the whole batch's target count: k micro-batches
        # then give exactly the gradient of one batch k times the size.
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step + state.skipped)
        grads, total, count, extra = gradients(state.params, batch, base, key)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def keep(new, old):  # non-finite step: the old value (elementwise: XLA fuses it into the update)
            return jnp.where(finite, new, old)

        new = TrainState(
            params=jax.tree.map(keep, params, state.params),
            opt_state=jax.tree.map(keep, opt_state, state.opt_state),
            step=state.step + finite.astype(jnp.int32),
            rng=state.rng,
            skipped=state.skipped + (~finite).astype(jnp.int32),
            nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32))
        metrics = dict(loss=loss, grad_norm=grad_norm, lr=current_lr(opt_state), tokens=count,
                       skipped=(~finite).astype(jnp.int32), nonfinite_streak=new.nonfinite_streak,
                       **{name: value / denom for name, value in extra.items()})
        return new, metrics

    if mesh is None:
        return jax.jit(step, donate_argnums=0)

    shard = state_shardings(cfg, optimizer, mesh, rules, lora)
    batch_shard = sharding.batch_sharding(mesh, 1, rules)  # a prefix: every batch leaf split on dim 0
    replicated = NamedSharding(mesh, PartitionSpec())

    def step_on_mesh(state, batch, *base):
        # The model's activation constraints read the mesh (and rules) while tracing.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.use_rules(rules):
            return step(state, batch, *base)

    # With LoRA (or an objective's reference) the base keeps the shardings it was placed with
    # (base_for_training): read, never donated.
    takes_base = lora is not None or objective is not None
    in_shardings = (shard, batch_shard, None) if takes_base else (shard, batch_shard)
    return jax.jit(step_on_mesh, in_shardings=in_shardings, out_shardings=(shard, replicated), donate_argnums=0)


# ---------------------------------------------------------------------------------------------
# Throughput


def flops_per_token(cfg: LlamaConfig, seq: int, causal: bool = False) -> float:
    """Training FLOPs per token: 6N (N = parameters without the embedding table) plus attention's
    score and value matmuls, 12 L d seq counted in full (PaLM's MFU convention, and this project's
    figures), or with `causal`, 6 L d seq: the half a causal mask leaves (MaxText's convention)."""
    n = param_count(cfg) - cfg.vocab_size * cfg.dim
    return 6.0 * n + (6.0 if causal else 12.0) * cfg.n_layers * cfg.dim * seq


def mfu(tokens_per_s: float, cfg: LlamaConfig, seq: int, peak_flops: float = H100_BF16_PEAK_FLOPS,
        n_devices: int = 1, causal: bool = False) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s (flops_per_token's convention) over
    `peak_flops` (per device) x devices."""
    return tokens_per_s * flops_per_token(cfg, seq, causal) / (peak_flops * n_devices)


def peak_flops_of(device_kind: str) -> float | None:
    """The dense bf16 peak FLOP/s of a chip, from its jax `device_kind`; None when PEAK_TFLOPS lacks it."""
    matches = [k for k in PEAK_TFLOPS if device_kind.startswith(k)]
    return PEAK_TFLOPS[max(matches, key=len)] * 1e12 if matches else None


# ---------------------------------------------------------------------------------------------
# The loop


class TrainingStopped(Exception):
    """Training cannot go on (too many non-finite steps in a row); the message says why."""


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint after the current step and returns.
    With several processes JAX's own preemption sync point decides, so that all save the same step."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        if jax.process_count() == 1:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.flag = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


@dataclasses.dataclass
class FitResult:
    state: TrainState
    status: str  # "done" | "preempted"
    history: list  # one metrics dict per step run


def fit(state: TrainState, step_fn: Callable, batches: Iterator[dict], *, steps: int, cfg: LlamaConfig, mesh=None,
        checkpoints=None, data_state: Callable[[], dict] | None = None, log: Callable[[dict], None] | None = None,
        max_nonfinite: int = 10, peak_flops: float | None = None, progress: bool = True) -> FitResult:
    """Run `step_fn` until `state.step` reaches `steps`. `batches` yields this process's rows of each
    step's batch (host numpy dicts; in one process, the whole batch): `place_batch` joins every process's
    rows into the global batch on `mesh`.

    The host never waits for a step to finish before it sends the next: it reads step n's metrics while
    the device runs step n + 1 (so `log` hears of each step one step late), and blocks only where a
    checkpoint is due. `checkpoints` (checkpoints.TrainCheckpointer): saved every N steps as configured
    there, at the end, and on SIGTERM (then returns with status "preempted"); `data_state()` gives the
    data position to save beside the state (the position after the batches sent so far). `log(metrics)`
    hears every step's metrics (with step, tokens_per_s, and with `peak_flops` per device, mfu and
    mfu_causal: flops_per_token's two conventions). More than `max_nonfinite` consecutive non-finite
    steps raise TrainingStopped."""
    from tqdm.auto import tqdm

    n_devices = mesh.size if mesh is not None else 1
    done = int(state.step)  # the steps the state has taken, as far as the host knows (one step late)
    bar = tqdm(total=steps, initial=done, disable=not progress, file=sys.stderr, dynamic_ncols=True, unit="step")
    history: list[dict] = []
    status = "done"
    in_flight = None  # the step sent last and not read yet: (its metrics on the device, global tokens, seq)
    t_last = time.perf_counter()

    def read(flight) -> dict:
        """A sent step's metrics (waits for it), logged; counts it in `done` unless it was skipped."""
        nonlocal done, t_last
        metrics, tokens_in_batch, seq = flight
        m = {k: v.item() for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        done += 0 if m["skipped"] else 1
        m["step"] = done
        m["tokens_per_s"] = tokens_in_batch / (now - t_last)
        if peak_flops:
            m["mfu"] = mfu(m["tokens_per_s"], cfg, seq, peak_flops, n_devices)
            m["mfu_causal"] = mfu(m["tokens_per_s"], cfg, seq, peak_flops, n_devices, causal=True)
        t_last = now
        history.append(m)
        if log is not None:
            log(m)
        if m["skipped"]:
            bar.write(f"step {m['step'] + 1}: non-finite gradients (loss {m['loss']}), update skipped "
                      f"({m['nonfinite_streak']} in a row)")
            if m["nonfinite_streak"] > max_nonfinite:
                raise TrainingStopped(
                    f"{m['nonfinite_streak']} consecutive steps had non-finite gradients after step "
                    f"{m['step']} (limit {max_nonfinite}); lower the learning rate or check the data")
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
        return m

    with _Preemption() as preemption:
        while done + (in_flight is not None) < steps:  # (a step in flight counts as taken until read)
            host = next(batches)
            if mesh is not None:
                batch = place_batch(host, mesh)
            else:
                batch = jax.tree.map(jnp.asarray, host)
            seq = batch["tokens"].shape[1] - ("targets" not in batch)
            state, metrics = step_fn(state, batch)
            sent = (metrics, batch["tokens"].shape[0] * seq, seq)
            if in_flight is not None:
                read(in_flight)  # the previous step's metrics, while the device runs this one
            in_flight = sent
            # `done + 1` is this step's number if it turns out finite; where a save may be due, wait for it.
            expected = done + 1
            if preemption.reached(expected):
                status = "preempted"  # saved below, after the step in flight is read
                break
            if checkpoints is not None and checkpoints.due(expected):
                read(in_flight)
                in_flight = None
                checkpoints.save(done, state, data_state() if data_state else {})
        if in_flight is not None:
            read(in_flight)
    bar.close()
    if checkpoints is not None:
        checkpoints.save(int(state.step), state, data_state() if data_state else {}, force=True)
        checkpoints.wait()
    return FitResult(state, status, history)
