"""Meta's released format: params.json + consolidated.NN.pth model-parallel shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints_convert import names
from checkpoints_convert.hf import REOPEN_BYTES, to_numpy
from checkpoints_convert.names import ConvertError, expected_shapes


def ffn_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's SwiGLU hidden size: 2/3 of 4*dim, scaled, rounded up to `multiple_of`."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def hf_config_from_params(params: dict[str, Any] | str | Path, vocab_size: int | None = None) -> dict[str, Any]:
    """The Hugging Face config.json dict equivalent to a Meta params.json."""
    source = "params.json"
    if not isinstance(params, dict):
        source = str(params)
        params = json.loads(Path(params).read_text())
    vocab = params.get("vocab_size", -1)
    if vocab is None or vocab <= 0:
        if vocab_size is None:
            raise ValueError(f"{source}: vocab_size is {vocab}; pass the tokenizer's vocabulary size")
        vocab = vocab_size
    dim, n_heads = params["dim"], params["n_heads"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": params.get("n_kv_heads") or n_heads,
        "intermediate_size": ffn_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
        "rms_norm_eps": params.get("norm_eps", 1e-6),
        "rope_theta": params.get("rope_theta", 10000.0),
        "max_position_embeddings": params.get("max_seq_len", 4096 if params.get("norm_eps") == 1e-5 else 2048),
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if params.get("use_scaled_rope"):
        config["rope_scaling"] = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0),
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
    return config


# ---------------------------------------------------------------------------------------------
# Reading consolidated.NN.pth shards

_IGNORED = ("rope.freqs",)  # rotary frequencies are recomputed from rope_theta


def meta_names(config: dict) -> dict[str, tuple[str, int | None]]:
    """Hugging Face name -> (Meta name, shard dim) for every tensor of this config's model (names.py)."""
    return {hf: (row.meta.format(i=i), row.meta_shard_dim) for hf, (row, i) in names.names(config).items()}


def _shard_index(path: Path) -> int | None:
    middle = path.name[len("consolidated."):-len(".pth")]
    return int(middle) if middle.isdigit() else None


class MetaReader:
    """A Meta release folder: params.json, consolidated.00.pth ... consolidated.NN.pth and (for
    LLaMA 1/2, whose params.json says vocab_size -1) tokenizer.model.

    Shards are opened memory-mapped (`torch.load(mmap=True, weights_only=True)`: no pickle code runs)
    and every key and shape is checked against params.json when the reader opens; `tensor` joins one
    tensor's pieces, so memory holds one tensor at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.exists():
            raise FileNotFoundError(f"{self.folder}: no such folder")
        params_path = self.folder / "params.json"
        if not params_path.is_file():
            raise ConvertError(f"{self.folder}: not a Meta checkpoint folder (no params.json)")
        try:
            params = json.loads(params_path.read_text())
        except json.JSONDecodeError as e:
            raise ConvertError(f"{params_path}: not valid JSON ({e})") from None
        self.tokenizer_path = self.folder / "tokenizer.model"
        vocab = None
        if params.get("vocab_size", -1) in (-1, None):
            if not self.tokenizer_path.is_file():
                raise ConvertError(f"{params_path}: vocab_size is {params.get('vocab_size')} and there is no "
                                   "tokenizer.model beside it to take the vocabulary size from")
            vocab = self._tokenizer_vocab_size()
        try:
            self.config = hf_config_from_params(params, vocab_size=vocab)
        except KeyError as e:
            raise ConvertError(f"{params_path}: missing key {e}") from None

        self.paths = self._shard_paths()
        self._rows = names.names(self.config)
        self._names = meta_names(self.config)
        self._open()
        self._check_shards()

    # -- files ------------------------------------------------------------------------------------

    def _tokenizer_vocab_size(self) -> int:
        import sentencepiece as spm

        try:
            return spm.SentencePieceProcessor(model_file=str(self.tokenizer_path)).get_piece_size()
        except (OSError, RuntimeError) as e:
            raise ConvertError(f"{self.tokenizer_path}: unreadable SentencePiece model ({e})") from None

    def _shard_paths(self) -> list[Path]:
        found = {}
        for p in self.folder.glob("consolidated.*.pth"):
            if _shard_index(p) is not None:
                found[_shard_index(p)] = p
        if not found:
            raise ConvertError(f"{self.folder}: no consolidated.NN.pth shards")
        n = max(found) + 1
        for i in range(n):
            if i not in found:
                raise ConvertError(f"{self.folder / f'consolidated.{i:02d}.pth'}: missing shard (expected {n} shards "
                                   f"numbered 00 to {n - 1:02d}; found {', '.join(f'{j:02d}' for j in sorted(found))})")
        return [found[i] for i in range(n)]

    def _open(self) -> None:
        import torch

        self._shards = []
        self._bytes_since_open = 0
        for path in self.paths:
            try:
                sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # truncated zip, not a torch file, or a pickle weights_only refuses
                raise ConvertError(f"{path}: unreadable .pth file, truncated or corrupt "
                                   f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
            if not isinstance(sd, dict):
                raise ConvertError(f"{path}: expected a dict of tensors, found {type(sd).__name__}")
            self._shards.append(sd)

    # -- validation -------------------------------------------------------------------------------

    def _check_shards(self) -> None:
        """Every shard holds exactly the model's keys, each 1/N of the full shape on its split dim."""
        n = len(self.paths)
        full_shapes = expected_shapes(self.config)
        wanted = {meta for meta, _ in self._names.values()}
        for path, sd in zip(self.paths, self._shards):
            for key in sd:
                if key not in wanted and not key.endswith(_IGNORED):
                    raise ConvertError(f"{path}: unknown key '{key}' (not a tensor of a LLaMA with "
                                       f"{self.config['num_hidden_layers']} layers)")
            for hf_name, (key, _) in self._names.items():
                if key not in sd:
                    raise ConvertError(f"{path}: missing key '{key}' (expected in each of the {n} shards)")
        self._split_dim = {}
        for hf_name, (key, dim) in self._names.items():
            full = full_shapes[hf_name]
            if dim is not None and n > 1 and hf_name == "model.embed_tokens.weight":
                dim = self._embedding_split(full)
            self._split_dim[hf_name] = dim
            for path, sd in zip(self.paths, self._shards):
                found = tuple(sd[key].shape)
                want = list(full)
                if dim is not None:
                    want[dim] = full[dim] // n
                if dim is not None and full[dim] % n:
                    raise ConvertError(f"{path}: {n} shards do not fit this model: key '{key}' has {full[dim]} "
                                       f"{'rows' if dim == 0 else 'columns'}, not divisible by {n}")
                if found != tuple(want):
                    if n == 1:
                        how = "the whole tensor in the only shard"
                    elif dim is None:
                        how = f"whole in each of the {n} shards"
                    else:
                        how = f"1/{n} of {list(full)} on dim {dim}, as each of {n} shards holds it"
                    raise ConvertError(f"{path}: key '{key}' has shape {list(found)}, expected {want} "
                                       f"(from params.json: {how}; a shard missing or extra also shows here)")

    def _embedding_split(self, full: tuple[int, int]) -> int:
        # LLaMA 1/2 split the embedding's columns, Llama 3 its rows: the first shard says which.
        n = len(self.paths)
        shape = tuple(self._shards[0][self._names["model.embed_tokens.weight"][0]].shape)
        return 0 if shape == (full[0] // n, full[1]) and full[0] % n == 0 else 1

    # -- the reader interface ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(self._names)

    def location(self, name: str) -> Path:
        return self.paths[0] if len(self.paths) == 1 else self.folder

    def source_key(self, name: str) -> str:
        """The Meta name of a tensor (for messages)."""
        return self._names[name][0] if name in self._names else name

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v) for k, v in expected_shapes(self.config).items() if k in self._names}

    def tensor(self, name: str) -> np.ndarray:
        """One tensor, its shards joined, q/k permuted to the half-split layout: [out, in] as
        Hugging Face stores it, in the checkpoint's dtype."""
        import torch

        if name not in self._names:
            raise ConvertError(f"{self.folder}: missing key '{name}'")
        if self._bytes_since_open > REOPEN_BYTES:
            self._open()  # unmap the pages earlier reads touched: resident memory stays near one tensor
        key, dim = self._names[name][0], self._split_dim[name]
        try:
            if dim is None or len(self._shards) == 1:
                t = self._shards[0][key].clone()
            else:
                t = torch.cat([sd[key] for sd in self._shards], dim=dim)
            w = to_numpy(t)
        except Exception as e:  # a short read from a damaged file
            raise ConvertError(f"{self.location(name)}: key '{key}' unreadable ({type(e).__name__}: {e})") from None
        self._bytes_since_open += w.nbytes
        heads = names.rotary_heads(self._rows[name][0], self.config)
        return w if heads is None else names.to_half_split(w, heads)

    def write_tokenizer(self, out_dir: str | Path) -> list[Path]:
        """Copy tokenizer.model (SentencePiece) into `out_dir`, when the folder has one."""
        if not self.tokenizer_path.is_file():
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [Path(shutil.copy2(self.tokenizer_path, out / "tokenizer.model"))]
