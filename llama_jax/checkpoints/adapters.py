"""LoRA runs on disk: the adapters of a `finetune --lora-rank` run, read, checked against a base, attached
to it, merged into it, or written as a Hugging Face PEFT adapter.

A LoRA run is a training run (training.py) whose state's `params` are the adapters only (lora.py's
pytree, {"layers": {"attn": {"q": {"a", "b"}, ...}, "mlp": {...}}}, float32) and whose metadata says
what they belong to: `lora` (LoraConfig.to_dict()), `base` (the base model's path) and `quantize_base`
(QLoRA's bits, or None).

    adapters, lora, meta = read_adapters("runs/alpaca")             # its latest step (or runs/alpaca/<step>)
    params = attach_run(base.config, base.params, "runs/alpaca")    # LoraWeight leaves (generate --adapter)
    params = merge_run(base.config, base.params, "runs/alpaca")     # w + (alpha / r) a @ b (lj.load of a run)
    save_merged(base, "runs/alpaca", "ckpt/merged")                  # a `convert` checkpoint (lora merge)
    export_peft("runs/alpaca", "hf/alpaca-lora")                     # adapter_config.json + safetensors
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
from etils import epath

from llama_jax import lora as lora_lib
from llama_jax import params as P
from llama_jax.checkpoints import orbax_io, training
from llama_jax.config import LlamaConfig
from llama_jax.qarray import QArray

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel wraps the transformers model, which holds `model.layers...`
# A base may differ from the adapters' run in these only: a run keeps float32 master params and trains
# in its --compute-dtype, while the same base loads in its own dtypes.
DTYPE_FIELDS = ("param_dtype", "compute_dtype")


def is_lora_run(path) -> bool:
    """Whether `path` is a LoRA run folder (or one of its step folders)."""
    return training.is_train_checkpoint(path) and isinstance(training.run_meta(path).get("lora"), dict)


def lora_run(path) -> tuple[lora_lib.LoraConfig, dict]:
    """(LoraConfig, metadata) of a LoRA run or step folder; one ValueError naming `path` otherwise."""
    if not epath.Path(path).exists():
        raise FileNotFoundError(f"{path}: no such folder")
    if not training.is_train_checkpoint(path):
        raise ValueError(f"{path}: not a training run (expected a `finetune --lora-rank` run folder or one of "
                         "its step folders)")
    meta = training.run_meta(path)
    if not isinstance(meta.get("lora"), dict):
        raise ValueError(f"{path}: not a LoRA run (it holds full params, not adapters; use it as a model)")
    try:
        return lora_lib.LoraConfig.from_dict(meta["lora"]), meta
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid LoRA settings in its metadata ({e})") from None


def _run_config(path, meta: dict) -> LlamaConfig:
    try:
        return LlamaConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: a training run without a valid saved config ({e})") from None


def base_of(path, meta: dict) -> str:
    """The base model the LoRA run `path` was trained on, as its metadata records it; one
    FileNotFoundError if it is no longer there (the adapters can still go onto the base given by hand)."""
    base = meta.get("base")
    if not base or not epath.Path(base).exists():
        raise FileNotFoundError(f"{path}: its base model {base or '(not recorded)'} is not there; give the base "
                                f"yourself: `--model BASE --adapter {path}` or `llama-jax lora merge BASE {path} OUT`")
    return str(base)


def check_base(cfg: LlamaConfig, path, meta: dict, base_name) -> None:
    """Refuse a base whose architecture differs from the one the run's adapters were trained on."""
    trained = _run_config(path, meta)
    for field in dataclasses.fields(LlamaConfig):
        ours, theirs = getattr(trained, field.name), getattr(cfg, field.name)
        if field.name not in DTYPE_FIELDS and ours != theirs:
            raise ValueError(f"{path}: its adapters belong to another model than {base_name} "
                             f"({field.name} {ours} in the run, {theirs} in {base_name})")


def _restore(path, cfg: LlamaConfig, lora: lora_lib.LoraConfig, mesh) -> dict:
    """The adapters of the step `path` stands for: a partial restore of the state's params (the
    optimizer state is not read), placed by lora.adapter_shardings on `mesh`, else on the first
    local device."""
    root, step = training.run_step(path)
    abstract = lora_lib.abstract_adapters(cfg, lora)
    if mesh is not None:
        shardings = lora_lib.adapter_shardings(cfg, lora, mesh)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
    target = orbax_io.with_shardings(abstract, shardings)
    return orbax_io.restore_tree(root / str(step) / "state", {"params": target}, "LoRA run", partial=True)["params"]


def read_adapters(path, mesh: jax.sharding.Mesh | None = None) -> tuple[dict, lora_lib.LoraConfig, dict]:
    """(adapters, LoraConfig, metadata) of a LoRA run folder (its latest complete step) or step folder."""
    lora, meta = lora_run(path)
    return _restore(path, _run_config(path, meta), lora, mesh), lora, meta


def attach_run(cfg: LlamaConfig, params: dict, path, base_name=None, mesh=None) -> dict:
    """`params`, a base of config `cfg`, with the LoRA run `path`'s adapters attached unmerged: a
    LoraWeight at each target, which the model runs as x @ w + (alpha / r) (x @ a) @ b."""
    lora, meta = lora_run(path)
    check_base(cfg, path, meta, base_name or "the base")
    return lora_lib.attach(params, _restore(path, cfg, lora, mesh), lora)


def merge_run(cfg: LlamaConfig, params: dict, path, base_name=None, mesh=None, dtype=None) -> dict:
    """`params`, a base of config `cfg`, with the LoRA run `path`'s adapters merged in: each target
    w + (alpha / r) a @ b, in `dtype` (default: the weight's own; a quantized one's float32), placed
    by the sharding rules on `mesh`."""
    lora, meta = lora_run(path)
    check_base(cfg, path, meta, base_name or "the base")
    merged = lora_lib.merge(params, _restore(path, cfg, lora, mesh), lora, dtype)
    if mesh is not None:  # merged eagerly: put each weight back where the rules place it
        merged = jax.device_put(merged, orbax_io.placement(cfg, mesh, merged))
    return merged


def _is_quantized(params: dict) -> bool:
    return any(isinstance(x, QArray) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))


def save_merged(base, path, out_dir: str | Path, base_name=None, overwrite: bool = False) -> Path:
    """Write `base` (a Loaded: config, float params, tokenizer) with the LoRA run `path`'s adapters
    merged in as a checkpoint in `convert`'s format, in the base's dtype; returns its path."""
    name = str(base_name or "the base")
    if _is_quantized(base.params):
        raise ValueError(f"{name}: a quantized model; merge onto the float model (and quantize the merge)")
    out = Path(out_dir).absolute()
    orbax_io.check_out_dir(out, overwrite, orbax_io.is_checkpoint, "a checkpoint")  # before reading the adapters
    lora, _ = lora_run(path)
    root, step = training.run_step(path)
    params = merge_run(base.config, base.params, path, name)
    with orbax_io.staged_output(out, overwrite) as tmp:
        # convert's layout (a zarr3 folder per parameter), which load checks and export_hf reads.
        orbax_io.save_tree(tmp / "params", params, use_ocdbt=False, use_zarr3=True)
        if base.tokenizer is not None:
            base.tokenizer.save(tmp)
        orbax_io.write_checkpoint_info(tmp, base.config, name, lora=lora.to_dict(), adapter=f"{root}/{step}")
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face PEFT


def is_peft_adapter(path) -> bool:
    return (Path(path) / PEFT_CONFIG).is_file()


def _hf_module(row: P.Param) -> str:
    """The transformers module a target weight belongs to, from the parameter table's HF name:
    "model.layers.{i}.self_attn.q_proj.weight" -> "model.layers.{i}.self_attn.q_proj"."""
    name = row.hf.hf
    if not name.endswith(".weight"):
        raise ValueError(f"{name}: not the weight of a Linear module; PEFT adapts those only")
    return name[:-len(".weight")]


def peft_tensors(adapters: dict, lora: lora_lib.LoraConfig, n_layers: int) -> dict[str, np.ndarray]:
    """The adapters as PEFT names them, in transformers' Linear layout [out, in]:
    lora_A.weight [rank, in_features] and lora_B.weight [out_features, rank], one pair per layer.

    Ours are a [layers, *in, rank] and b [layers, rank, *out] beside w [*in, *out]. Every target's
    HF weight is ours flattened to [in, out] (row-major, as params.py's to_hf reshapes) and transposed,
    so a flattened and transposed is lora_A and b likewise lora_B: B_hf @ A_hf = (a @ b).T."""
    out = {}
    for name in lora.targets:
        row = lora_lib.TARGETS[name]
        ab = P.get(adapters, row.path)
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        n_in = math.prod(a.shape[1:-1])
        module = PEFT_PREFIX + _hf_module(row)
        for i in range(n_layers):
            key = module.format(i=i)
            out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(n_in, lora.rank).T)
            out[f"{key}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)
    return out


def peft_config(lora: lora_lib.LoraConfig, base_model: str) -> dict:
    """adapter_config.json: a LoRA of scale lora_alpha / r (not rsLoRA's) on the Linear modules named
    in target_modules, no biases, weights stored [out, in] (fan_in_fan_out false)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": [_hf_module(lora_lib.TARGETS[t]).rsplit(".", 1)[1] for t in lora.targets],
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "inference_mode": True}


def export_peft(path, out_dir: str | Path, overwrite: bool = False, base_model: str | None = None) -> Path:
    """Write the LoRA run `path`'s adapters as a Hugging Face PEFT adapter folder (adapter_config.json,
    adapter_model.safetensors) that PeftModel.from_pretrained puts onto the base's HF export (`export
    hf`); returns its path. `base_model`: its base_model_name_or_path (default: the run's base)."""
    from safetensors.numpy import save_file  # optional: the `convert` extra, like the rest of `export`

    lora, meta = lora_run(path)
    cfg = _run_config(path, meta)
    out = Path(out_dir).absolute()
    orbax_io.check_out_dir(out, overwrite, is_peft_adapter, "a PEFT adapter")  # before reading the adapters
    tensors = peft_tensors(_restore(path, cfg, lora, None), lora, cfg.n_layers)
    with orbax_io.staged_output(out, overwrite, "a PEFT adapter", is_peft_adapter) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        config = peft_config(lora, base_model or str(meta.get("base") or ""))
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=1))
    return out
