"""Model configuration: one frozen dataclass, presets as data, and builders from released formats."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from checkpoints_convert.gguf import GGUFReader
from checkpoints_convert.meta import ffn_dim, hf_config_from_params

_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 ("llama3") frequency scaling: long wavelengths are divided by `factor`, short ones
    kept, the band between interpolated."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: dim // n_heads (every LLaMA); set for models that differ
    param_dtype: str = "float32"
    compute_dtype: str = "bfloat16"
    # Tokens the tokenizer does not know about (set from the checkpoint's config when present).
    bos_id: int | None = 1
    eos_id: int | None = 2

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(
                    f"LlamaConfig: dim={self.dim} is not divisible by n_heads={self.n_heads} "
                    "(set head_dim explicitly for models whose head_dim * n_heads != dim)")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be a positive even number (rotary pairs), got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads} "
                "(grouped-query attention shares each kv head among n_heads // n_kv_heads query heads)")
        if not self.norm_eps > 0:
            raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"LlamaConfig.{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if isinstance(self.rope_scaling, dict):  # from JSON metadata
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

    @property
    def param_jnp_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def compute_jnp_dtype(self):
        return jnp.dtype(self.compute_dtype)

    def replace(self, **changes) -> "LlamaConfig":
        if "dim" in changes or "n_heads" in changes:
            changes.setdefault("head_dim", None)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LlamaConfig: unknown fields {unknown}")
        return cls(**d)


def from_hf_config(config: dict[str, Any] | str | Path, **overrides) -> LlamaConfig:
    """A LlamaConfig from a Hugging Face `config.json` (a path, a folder holding one, or the dict)."""
    source = "config"
    if not isinstance(config, dict):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        source = str(path)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (a Hugging Face folder needs config.json)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None

    def need(key):
        if key not in config:
            raise ValueError(f"{source}: missing key '{key}'")
        return config[key]

    arch = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
        raise ValueError(f"{source}: model_type {config.get('model_type')!r} is not a LLaMA model")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{source}: {flag}=true is not a LLaMA layout (no biases)")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} unsupported (LLaMA uses silu)")

    # transformers >= 5 keeps theta and scaling together in rope_parameters; older configs split them.
    rope = dict(config.get("rope_parameters") or {})
    if config.get("rope_scaling"):
        rope.update(config["rope_scaling"])
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(
            factor=float(rope["factor"]),
            low_freq_factor=float(rope["low_freq_factor"]),
            high_freq_factor=float(rope["high_freq_factor"]),
            original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(f"{source}: rope type {rope_type!r} unsupported (default and llama3 are)")

    n_heads = need("num_attention_heads")
    dim = need("hidden_size")
    head_dim = config.get("head_dim")
    kwargs = dict(
        vocab_size=need("vocab_size"),
        dim=dim,
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        ffn_dim=need("intermediate_size"),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        max_seq_len=int(config.get("max_position_embeddings", 4096)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        head_dim=None if head_dim in (None, dim // n_heads) else head_dim,
        bos_id=config.get("bos_token_id"),
        eos_id=_first(config.get("eos_token_id")),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _first(x):
    return x[0] if isinstance(x, (list, tuple)) else x


def to_hf_config(cfg: LlamaConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` dict for a LlamaConfig (used by `export hf`)."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.ffn_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "torch_dtype": cfg.param_dtype,
    }
    if cfg.rope_scaling is not None:
        d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
    return d


def from_params_json(params: dict[str, Any] | str | Path, vocab_size: int | None = None, **overrides) -> LlamaConfig:
    """A LlamaConfig from Meta's `params.json`. Its vocab_size is -1 in LLaMA-1/2 releases: pass the
    tokenizer's size then."""
    return from_hf_config(hf_config_from_params(params, vocab_size=vocab_size), **overrides)


def from_gguf(path: str | Path, **overrides) -> LlamaConfig:
    """A LlamaConfig from a GGUF file's metadata."""
    return from_hf_config(GGUFReader(path).config, **overrides)


def _llama(dim, n_layers, n_heads, norm_eps, max_seq_len, n_kv_heads=None, multiple_of=256, mult=None):
    return LlamaConfig(
        vocab_size=32000, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads,
        ffn_dim=ffn_dim(dim, multiple_of, mult), norm_eps=norm_eps, max_seq_len=max_seq_len)


# Released hyper-parameters (each release's params.json or config.json), and tiny configs for tests and CPU experiments.
PRESETS: dict[str, LlamaConfig] = {
    "llama-7b": _llama(4096, 32, 32, 1e-6, 2048),
    "llama-13b": _llama(5120, 40, 40, 1e-6, 2048),
    "llama-33b": _llama(6656, 60, 52, 1e-6, 2048),
    "llama-65b": _llama(8192, 80, 64, 1e-5, 2048),
    "llama2-7b": _llama(4096, 32, 32, 1e-5, 4096),
    "llama2-13b": _llama(5120, 40, 40, 1e-5, 4096),
    "llama2-70b": _llama(8192, 80, 64, 1e-5, 4096, n_kv_heads=8, multiple_of=4096, mult=1.3),
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling(), max_seq_len=131072, bos_id=128000, eos_id=128001),
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, norm_eps=1e-5,
        rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_id=2),
    "tiny": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=172,
                        max_seq_len=128, param_dtype="float32", compute_dtype="float32"),
    "tiny-gqa": LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=172,
                            max_seq_len=128, param_dtype="float32", compute_dtype="float32"),
}
