"""Quantized models on disk: checkpoints written by `quantize` (the layout of orbax_io.py, each QArray
stored as a folder of arrays {values, scales[, zeros]} and the scheme in llama_jax.json under
"quantization"), and GGUF files whose Q8_0 / Q4_0 / Q4_1 blocks are kept as shipped."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax

from checkpoints_convert.hf import TOKENIZER_FILES
from llama_jax import params as P
from llama_jax.checkpoints import orbax_io
from llama_jax.config import LlamaConfig
from llama_jax.qarray import QArray
from llama_jax.quantize import abstract_quantized, params_from_gguf, scheme


def _as_dicts(tree):
    """QArrays as {values, scales[, zeros]} dicts: the plain containers Orbax stores."""
    return jax.tree.map(lambda x: {k: v for k, v in (("values", x.values), ("scales", x.scales),
                                                      ("zeros", x.zeros)) if v is not None}
                        if isinstance(x, QArray) else x, tree, is_leaf=lambda x: isinstance(x, QArray))


def _from_dicts(tree, template):
    return jax.tree.map(lambda t, x: dataclasses.replace(t, values=x["values"], scales=x["scales"],
                                                         zeros=x.get("zeros")) if isinstance(t, QArray) else x,
                        template, tree, is_leaf=lambda x: isinstance(x, QArray))


def is_quantized_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return orbax_io.is_checkpoint(path) and bool(orbax_io.read_checkpoint_info(path).get("quantization"))


def save_quantized(model, out_dir: str | Path, source: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write a Loaded whose params hold QArrays as an Orbax checkpoint at `out_dir` (written beside
    it and renamed when complete, like `convert`), with its tokenizer: the tokenizer files of a
    `source` folder that holds them, copied as they are, else the model's tokenizer written out."""
    out = Path(out_dir).absolute()
    with orbax_io.staged_output(out, overwrite) as tmp:
        orbax_io.save_tree(tmp / "params", _as_dicts(model.params))
        src = None if source is None else Path(source)
        if src is not None and src.is_dir() and orbax_io.has_tokenizer(src):
            for name in TOKENIZER_FILES:
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
        elif model.tokenizer is not None:
            model.tokenizer.save(tmp)
        orbax_io.write_checkpoint_info(tmp, model.config, str(source or ""), quantization=scheme(model.params))
    return out


def restore_quantized(path: str | Path, mesh: jax.sharding.Mesh | None = None) -> tuple[LlamaConfig, dict]:
    """(config, params) of a checkpoint written by `save_quantized`: QArrays restored as stored, placed
    by the model's sharding rules on `mesh` (else on the first local device)."""
    path = Path(path)
    info = orbax_io.read_checkpoint_info(path)
    if not info.get("quantization"):
        raise ValueError(f"{path}: not a quantized checkpoint (no 'quantization' in {orbax_io.CHECKPOINT_META})")
    cfg = orbax_io.config_of(path)
    template = abstract_quantized(cfg, info["quantization"])
    target = orbax_io.with_shardings(_as_dicts(template), _as_dicts(orbax_io.placement(cfg, mesh, template)))
    tree = orbax_io.restore_tree(path / "params", target, "quantized checkpoint")
    for p, want in P.leaves(target):
        got = P.get(tree, p)
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise ValueError(f"{path}: {'.'.join(p)} stored as {got.dtype}{list(got.shape)}, "
                             f"expected {want.dtype}{list(want.shape)} from {orbax_io.CHECKPOINT_META}")
    return cfg, _from_dicts(tree, template)


def gguf_kept_quantized(path: str | Path, mesh: jax.sharding.Mesh | None = None,
                        dtype: str | None = None) -> tuple[LlamaConfig, dict]:
    """(config, params) of a GGUF file, its Q8_0 / Q4_0 / Q4_1 weights kept as shipped (quantize.py's
    params_from_gguf), placed like `restore_quantized`."""
    cfg, tree = params_from_gguf(path, dtype=dtype)
    return cfg, jax.device_put(tree, orbax_io.placement(cfg, mesh, tree))
