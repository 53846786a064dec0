"""`load`: a model from any path llama-jax reads, ready to use.

    model = lj.load("path")     # model.config, model.params, model.tokenizer
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import numpy as np

from checkpoints_convert.gguf import is_gguf
from llama_jax import params as P
from llama_jax.checkpoints import adapters, orbax_io, quantized, training
from llama_jax.checkpoints.convert import default_gguf, default_model
from llama_jax.checkpoints.readers import CheckedReader, reader_for, validate
from llama_jax.config import LlamaConfig, from_hf_config
from llama_jax.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf


@dataclasses.dataclass
class Loaded:
    """A model ready to use: its config, its params pytree and its tokenizer (None if it has none)."""

    config: LlamaConfig
    params: Any
    tokenizer: Any = None


def load(path: str | Path | None = None, *, mesh: jax.sharding.Mesh | None = None, dtype: str | None = None,
         compute_dtype: str | None = "auto", keep_quantized: bool = False) -> Loaded:
    """A model, with its config and tokenizer, from any of:

    - an Orbax checkpoint made by `llama-jax convert`, or a quantized one made by `llama-jax quantize`
      (its weights stay quantized);
    - a `llama-jax train` / `finetune` run folder (its latest complete step) or one of its step folders
      (that step), with the run's config and tokenizer; a LoRA run (`finetune --lora-rank`): the base
      its metadata names, with that step's adapters merged in;
    - a GGUF file (decoded to floats; `keep_quantized`: its Q8_0 / Q4_0 / Q4_1 weights kept as shipped);
    - a Hugging Face folder (config.json + safetensors) or a Meta folder (params.json + .pth);
    - nothing: the default model, SmolLM2-135M-Instruct (converted once into the cache).

    `mesh`: params are placed by the model's sharding rules (from an Orbax checkpoint or run, each
    device reads only its own shards); else on the first local device.
    `dtype`: the parameter dtype; default the checkpoint's own (Orbax checkpoints and runs), float32
    for the released formats (exact for all of them). A quantized model's codes and scales stay as
    stored whatever `dtype` says.
    `compute_dtype`: the matmul dtype. "auto" (the one rule of the Python API and the command line):
    float32 when the devices the load uses are CPUs (they have no bfloat16 units, and small models'
    near-ties flip in bfloat16), the config's compute dtype elsewhere. None keeps the config's; a
    name sets it.

    Anything that is not a model raises one ValueError or FileNotFoundError naming the path."""
    if path is None:
        path = default_gguf() if keep_quantized else default_model()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if keep_quantized and not is_gguf(path) and not quantized.is_quantized_checkpoint(path):
        raise ValueError(f"{path}: keep_quantized (--keep-quantized) needs a GGUF file "
                         "(quantize other models with `llama-jax quantize`)")
    model = _read(path, mesh, dtype, keep_quantized)
    resolved = _compute_dtype(compute_dtype, mesh)
    if resolved is not None:
        model.config = model.config.replace(compute_dtype=resolved)
    return model


def _compute_dtype(compute_dtype: str | None, mesh: jax.sharding.Mesh | None) -> str | None:
    if compute_dtype != "auto":
        return compute_dtype
    devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
    return "float32" if devices[0].platform == "cpu" else None


def _read(path: Path, mesh, dtype, keep_quantized) -> Loaded:
    if orbax_io.is_checkpoint(path):
        if quantized.is_quantized_checkpoint(path):
            cfg, params = quantized.restore_quantized(path, mesh)
        else:
            cfg = orbax_io.config_of(path)
            cfg = cfg if dtype is None else cfg.replace(param_dtype=dtype)
            target = orbax_io.with_shardings(P.abstract(cfg), orbax_io.placement(cfg, mesh))
            orbax_io.check_stored_shapes(path / "params", target)
            params = orbax_io.restore_tree(path / "params", target)
        return Loaded(cfg, params, load_tokenizer(path) if orbax_io.has_tokenizer(path) else None)
    if training.is_train_checkpoint(path):
        if adapters.is_lora_run(path):
            return _read_lora_run(path, mesh, dtype)
        cfg = training.run_config(path)
        cfg = cfg if dtype is None else cfg.replace(param_dtype=dtype)
        return Loaded(cfg, training.restore_run_params(path, cfg, mesh), run_tokenizer(path))
    if keep_quantized:
        cfg, params = quantized.gguf_kept_quantized(path, mesh, dtype)
        return Loaded(cfg, params, load_tokenizer(path))
    reader = reader_for(path)
    if reader is None:
        raise ValueError(f"{path}: not a model (expected a checkpoint made by `llama-jax convert` or `quantize` "
                         f"(holding {orbax_io.CHECKPOINT_META}), a `train` / `finetune` run folder, a GGUF file, "
                         "or a Hugging Face or Meta folder)")
    cfg = from_hf_config(reader.config, param_dtype=dtype or "float32")
    validate(reader)
    checked, shardings = CheckedReader(reader), orbax_io.placement(cfg, mesh)
    # One leaf in host memory at a time, straight onto its devices.
    params = P.tree_of(cfg, lambda row: jax.device_put(
        P.leaf_from_reader(checked, row, cfg, np.dtype(cfg.param_jnp_dtype)), P.get(shardings, row.path)))
    return Loaded(cfg, params, _reader_tokenizer(reader, path))


def _read_lora_run(path: Path, mesh, dtype) -> Loaded:
    """A LoRA run's step: the base its metadata names, loaded as `load` would, with the step's adapters
    merged in (in `dtype`, default the base's own), and the run's tokenizer."""
    _, meta = adapters.lora_run(path)
    base = adapters.base_of(path, meta)
    model = _read(Path(base), mesh, dtype, keep_quantized=False)
    model.params = adapters.merge_run(model.config, model.params, path, base, mesh, dtype)
    model.tokenizer = run_tokenizer(path) or model.tokenizer
    return model


def run_tokenizer(path: str | Path) -> Tokenizer | None:
    """A training run's tokenizer: the files in its run folder, else the source its metadata records."""
    root, _ = training.run_step(path)
    if orbax_io.has_tokenizer(root):
        return load_tokenizer(root)
    source = training.run_meta(path).get("tokenizer")
    return load_tokenizer(source) if source and Path(source).exists() else None


def _reader_tokenizer(reader, path: Path) -> Tokenizer | None:
    """The model's tokenizer: from the GGUF metadata or the folder's tokenizer files (None if none)."""
    if hasattr(reader, "tokenizer_model"):  # a GGUF file
        return tokenizer_from_gguf(reader) if reader.tokenizer_model in ("llama", "gpt2") else None
    folder = path if path.is_dir() else path.parent
    return load_tokenizer(folder) if orbax_io.has_tokenizer(folder) else None
