"""Whole models, quantized: every linear weight (and optionally the embeddings) as a QArray (qarray.py).

    qparams = quantize_params(params, cfg, bits=4, group=64)   # the parameter table's quantizable weights
    logits = lj.forward(qparams, tokens, cfg)                   # the model code is unchanged
    params = dequantize_params(qparams)                         # back to float
    cfg, qparams = params_from_gguf(path)                       # Q8_0 / Q4_0 / Q4_1 blocks kept as shipped

Which weights quantize, and along which axis, is the parameter table's (params.py `quant_split`,
`quant_axis`). The model multiplies by a QArray through the ops layer (ops/matmul.py), which reads the
codes in a fused kernel where the kernel policy has one.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints_convert.gguf import GGUFReader
from checkpoints_convert.names import rotary_heads, to_half_split
from llama_jax import params
from llama_jax.config import LlamaConfig, from_hf_config
from llama_jax.qarray import QArray, nbytes_of, quantize

# ---------------------------------------------------------------------------------------------
# Whole models

LINEAR = tuple(p.path for p in params.TABLE if p.quant_split is not None and p.stacked)  # q k v o gate up down
EMBED, LM_HEAD = ("embed",), ("lm_head",)


def quantize_params(tree, cfg: LlamaConfig, bits: int = 8, group: int | None = None,
                    include_embeddings: bool = False, *, zero_point: bool | None = None,
                    scale_dtype: str = "float16", codebook: str | None = None):
    """`tree` (a params pytree) with every linear weight a QArray (a new tree; `tree` is left as it is).

    bits 8: per output channel (group None) or groups of 32/64/128 along the contraction axis.
    bits 4: groups (default 64) with a zero point like Q4_1 (the default: on stories260K it loses 7%
    of perplexity where symmetric groups lose 15%), or symmetric like Q4_0 (zero_point=False).
    include_embeddings: the embedding and the lm_head too (the embedding is gathered by row, so it is
    grouped along the model dimension; tied models then reuse it transposed as the lm_head).
    codebook "nf4": QLoRA's NormalFloat4 codes instead of int4's (bits 4; read by XLA, not the kernels)."""
    if bits == 4 and group is None:
        group = 64
    if zero_point is None:
        zero_point = bits == 4 and codebook is None
    out = params.copy(tree)
    for row in params.params_of(cfg):
        if row.quant_split is None or not (row.stacked or include_embeddings):
            continue
        w = params.get(out, row.path)
        if isinstance(w, QArray):
            continue
        params.set_(out, row.path, quantize(w, bits, group, split=row.quant_split, axis=row.quant_axis,
                                            stacked=row.stacked, zero_point=zero_point, scale_dtype=scale_dtype,
                                            codebook=codebook))
    return out


def dequantize_params(tree, dtype=jnp.float32):
    """Every QArray of `tree` decoded to a float array of `dtype` (other leaves unchanged)."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QArray) else x, tree,
                        is_leaf=lambda x: isinstance(x, QArray))


def is_quantized(tree) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, QArray)))


def param_bytes(tree) -> int:
    """Bytes of a params tree (arrays or jax.eval_shape's ShapeDtypeStructs), QArrays counted as stored."""
    return sum(nbytes_of(x) for x in jax.tree.leaves(tree))


def scheme(tree) -> dict:
    """How `tree` is quantized, for checkpoint metadata: {"a.b.c": {bits, group, axis, split, tail,
    zero_point, scale_dtype}} for every QArray ({} for a float tree). `abstract_quantized` inverts it."""
    out = {}
    for path, leaf in params.leaves(tree):
        if isinstance(leaf, QArray):
            out[".".join(path)] = dict(bits=leaf.bits, group=leaf.group, axis=leaf.axis, split=leaf.split,
                                       tail=list(leaf.tail), zero_point=leaf.zeros is not None,
                                       scale_dtype=str(jnp.dtype(leaf.scales.dtype)))
    return out


def abstract_quantized(cfg: LlamaConfig, scheme_: dict):
    """The params tree (ShapeDtypeStructs, QArrays where `scheme_` says) that `scheme(params)` described."""
    tree = params.abstract(cfg)
    for name, s in scheme_.items():
        path = tuple(name.split("."))
        lead = (cfg.n_layers,) if path[0] == "layers" else ()
        tail = tuple(s["tail"])
        m = [math.prod(tail[:s["split"]]), math.prod(tail[s["split"]:])]
        a = s["axis"] + 2
        m[a] = -(-m[a] // s["group"]) * s["group"]  # padded to whole groups
        groups = list(m)
        groups[a] //= s["group"]
        m[a] = m[a] * s["bits"] // 8  # int4: two codes a byte
        sds = lambda shape, dt: jax.ShapeDtypeStruct(lead + tuple(shape), jnp.dtype(dt))  # noqa: E731
        params.set_(tree, path, QArray(sds(m, jnp.int8 if s["bits"] == 8 else jnp.uint8),
                                       sds(groups, s["scale_dtype"]),
                                       sds(groups, s["scale_dtype"]) if s["zero_point"] else None,
                                       s["bits"], s["group"], s["axis"], tail, s["split"]))
    return tree


# ---------------------------------------------------------------------------------------------
# GGUF: Q8_0, Q4_0 and Q4_1 blocks straight into QArrays (moving bytes, decoding nothing)

# ggml block layouts, 32 weights a block along a row (the input axis of an [out, in] weight):
#   Q8_0: f16 d, 32 x int8 q               value = q * d
#   Q4_0: f16 d, 16 bytes of nibbles       value = (u - 8) * d
#   Q4_1: f16 d, f16 m, 16 bytes           value = u * d + m
# Nibbles: byte j holds u_j (low) and u_{j+16} (high), which is QArray's int4 order for group 32.
GGUF_TYPES = {"Q8_0": (8, 34, 2), "Q4_0": (4, 18, 2), "Q4_1": (4, 20, 4)}  # bits, bytes/block, header bytes


def gguf_blocks(data: np.ndarray, qtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The raw blocks of an [out, in] GGUF tensor (uint8 [out, in/32 * bytes/block], as the gguf
    package gives it) -> codes [out, in/32, 32 int8 | 16 uint8], scales f16 [out, in/32], mins or None."""
    if qtype not in GGUF_TYPES:
        raise ValueError(f"GGUF type {qtype} cannot be kept quantized (supported: {', '.join(GGUF_TYPES)})")
    bits, size, header = GGUF_TYPES[qtype]
    b = np.asarray(data, np.uint8)
    b = b.reshape(b.shape[0], -1, size)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0] if qtype == "Q4_1" else None
    codes = np.ascontiguousarray(b[..., header:])
    return (codes.view(np.int8) if bits == 8 else codes), d, m


def qarray_from_gguf(data: np.ndarray, qtype: str, tail: tuple[int, ...], split: int = 1,
                     embedding: bool = False, permute_heads: int | None = None) -> QArray:
    """One [out, in] GGUF tensor as a QArray in our layout: transposed to [in, out] (grouped along
    `in`, axis -2), or for the embedding kept [vocab, dim] (grouped along dim, axis -1).
    permute_heads: q/k's interleaved rotary rows are reordered to the half-split layout with that
    many heads (a permutation of whole rows, so of whole blocks)."""
    codes, d, m = gguf_blocks(data, qtype)
    if permute_heads:
        codes, d = to_half_split(codes, permute_heads), to_half_split(d, permute_heads)
        m = None if m is None else to_half_split(m, permute_heads)
    bits = GGUF_TYPES[qtype][0]
    out, nb = d.shape
    if embedding:
        values = codes.reshape(out, -1)
        return QArray(values, d, m, bits, 32, -1, tuple(tail), split)
    # [out, blocks, bytes] -> [blocks, bytes, out] -> rows = the input axis (two codes a byte for int4).
    values = codes.transpose(1, 2, 0).reshape(-1, out)
    return QArray(values, d.T.copy(), None if m is None else m.T.copy(), bits, 32, -2, tuple(tail), split)


def params_from_gguf(path: str | Path, include_embeddings: bool = True, dtype: str | None = None):
    """(cfg, params) from a GGUF file with its Q8_0 / Q4_0 / Q4_1 weights kept quantized as shipped:
    each becomes a QArray holding the file's own codes and scales, so decoding it gives exactly what
    llama.cpp (and gguf.quants.dequantize) would. Leaves of other types (F32 norms, or a weight whose
    layers mix types) are read as floats of `dtype` (default: the config's param dtype).
    include_embeddings False: the embedding and lm_head are read as floats too."""
    import gguf  # the `gguf` extra: only GGUF files need it

    reader = GGUFReader(path)
    cfg = from_hf_config(reader.config)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    raw = {t.name: t for t in gguf.GGUFReader(Path(path), "r").tensors}
    tree: dict = {}
    for row in params.params_of(cfg):
        leaf = None
        if row.quant_split is not None and (row.stacked or include_embeddings):
            leaf = _gguf_leaf(raw, row, cfg, reader.config)
        if leaf is None:
            leaf = jnp.asarray(params.leaf_from_reader(reader, row, cfg, np.dtype(cfg.param_dtype)))
        params.set_(tree, row.path, leaf)
    return cfg, tree


def _gguf_leaf(raw: dict, row: params.Param, cfg: LlamaConfig, hf_config: dict) -> QArray | None:
    names = [row.hf.gguf.format(i=i) for i in range(cfg.n_layers)] if row.stacked else [row.hf.gguf]
    types = {raw[n].tensor_type.name for n in names}
    if len(types) != 1 or next(iter(types)) not in GGUF_TYPES:
        if types - set(GGUF_TYPES) - {"F32", "F16", "BF16"} or len(types) > 1:
            warnings.warn(f"GGUF {names[0]}: types {sorted(types)} are read as float (kept quantized: "
                          f"{', '.join(GGUF_TYPES)}, one type for every layer)", stacklevel=3)
        return None
    qtype = types.pop()
    qs = [qarray_from_gguf(raw[n].data, qtype, row.shape(cfg), row.quant_split, embedding=row.quant_axis == -1,
                           permute_heads=rotary_heads(row.hf, hf_config)) for n in names]
    if not row.stacked:
        q = qs[0]
        return dataclasses.replace(q, values=jnp.asarray(q.values), scales=jnp.asarray(q.scales),
                                   zeros=None if q.zeros is None else jnp.asarray(q.zeros))
    stack = lambda xs: None if xs[0] is None else jnp.asarray(np.stack(xs))  # noqa: E731
    return dataclasses.replace(qs[0], values=stack([q.values for q in qs]), scales=stack([q.scales for q in qs]),
                               zeros=stack([q.zeros for q in qs]))
