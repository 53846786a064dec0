"""GGUF files (llama.cpp's format): one file holding the config and tokenizer as metadata and the
tensors, possibly quantized. Read through the `gguf` package; tensors are memory-mapped and
dequantized one at a time to float32 (F16 stays float16).

Two things differ from the Hugging Face layout and are undone here:
- GGUF lists a tensor's dims fastest-first (ggml order), so `tensor.shape` is reversed; the numpy
  view the `gguf` package gives is already [out, in] like Hugging Face.
- q and k are stored in Meta's interleaved rotary order (llama.cpp's converter permutes them);
  `names.to_half_split` permutes them back to Hugging Face's half-split order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints_convert import names
from checkpoints_convert.names import ConvertError

MAGIC = b"GGUF"

_IGNORED = {"rope_freqs.weight"}  # checked in __init__, never returned

# Tensor types this reader dequantizes (gguf.quants.dequantize handles them all).
_SUPPORTED = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}

# Byte-level BPE pre-tokenizers by `tokenizer.ggml.pre` (the text split the merges were learned on).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell")  # each digit its own word first
_LLAMA3 = ("llama-bpe", "llama3", "llama-v3", "smaug-bpe")


def _f32_str(x) -> float:
    # Metadata floats are float32 (1e-5 arrives as 9.99999974e-06); keep the shortest decimal.
    return float(str(np.float32(x)))


class GGUFReader:
    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != MAGIC:
            raise ConvertError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        try:
            self._r = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # truncated header / tensor data past the end of the file
            raise ConvertError(f"{self.path}: unreadable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") \
                from None
        self.meta = {}
        for name, field in self._r.fields.items():
            if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                        "tokenizer.ggml.token_type"):
                continue  # big arrays: read on demand
            try:
                self.meta[name] = field.contents()
            except Exception:  # an odd field type we do not need
                pass
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise ConvertError(f"{self.path}: architecture {arch!r} is not supported (only 'llama')")
        self._tensors = {t.name: t for t in self._r.tensors}
        self.config = self._hf_config()
        self._names = self._name_map()
        for t in self._tensors.values():
            if t.name in self._names.values() and t.tensor_type.name not in _SUPPORTED:
                raise ConvertError(f"{self.path}: tensor {t.name} has type {t.tensor_type.name}; "
                                   f"supported: {sorted(_SUPPORTED)}")
        if "rope_freqs.weight" in self._tensors:
            factors = gguf.quants.dequantize(self._tensors["rope_freqs.weight"].data,
                                             self._tensors["rope_freqs.weight"].tensor_type)
            if not np.allclose(factors, 1.0):
                raise ConvertError(f"{self.path}: rope frequency factors (llama3 rope scaling stored as "
                                   "rope_freqs.weight) are not supported")

    # -- metadata ---------------------------------------------------------------------------------

    def _need(self, key):
        if key not in self.meta:
            raise ConvertError(f"{self.path}: missing metadata key '{key}'")
        return self.meta[key]

    def _field_list(self, key) -> list | None:
        field = self._r.fields.get(key)
        return None if field is None else list(field.contents())

    def _hf_config(self) -> dict[str, Any]:
        p = "llama."
        dim = int(self._need(p + "embedding_length"))
        n_heads = int(self._need(p + "attention.head_count"))
        tokens = self._r.fields.get("tokenizer.ggml.tokens")
        vocab = self.meta.get(p + "vocab_size") or (len(tokens.data) if tokens is not None else None)
        if vocab is None:  # no token list: the embedding's row count (GGUF dims are reversed)
            vocab = int(self._tensors["token_embd.weight"].shape[-1])
        config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": int(vocab),
            "hidden_size": dim,
            "num_hidden_layers": int(self._need(p + "block_count")),
            "num_attention_heads": n_heads,
            "num_key_value_heads": int(self.meta.get(p + "attention.head_count_kv", n_heads)),
            "intermediate_size": int(self._need(p + "feed_forward_length")),
            "rms_norm_eps": _f32_str(self.meta.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32_str(self.meta.get(p + "rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.meta.get(p + "context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "hidden_act": "silu",
            "bos_token_id": self.meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.meta.get("tokenizer.ggml.eos_token_id"),
        }
        head_dim = self.meta.get(p + "attention.key_length")
        if head_dim is not None and int(head_dim) != dim // n_heads:
            config["head_dim"] = int(head_dim)
        scaling = self.meta.get(p + "rope.scaling.type")
        if scaling not in (None, "none"):
            raise ConvertError(f"{self.path}: rope scaling {scaling!r} is not supported")
        return config

    def _name_map(self) -> dict[str, str]:
        """Hugging Face name -> GGUF name, for every tensor a LLaMA of this config has (names.py)."""
        found = {hf: row.gguf.format(i=i) for hf, (row, i) in names.names(self.config).items()}
        missing = [g for g in found.values() if g not in self._tensors]
        if missing:
            raise ConvertError(f"{self.path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        known = set(found.values()) | _IGNORED
        unknown = sorted(set(self._tensors) - known)
        if unknown:
            raise ConvertError(f"{self.path}: unexpected tensors {unknown[:5]} (not a plain LLaMA)")
        return found

    # -- tensors ----------------------------------------------------------------------------------

    def keys(self) -> list[str]:
        return sorted(self._names)

    def tensor(self, name: str) -> np.ndarray:
        """One tensor in Hugging Face name, shape [out, in] and rotary layout."""
        import gguf

        if name not in self._names:
            raise ConvertError(f"{self.path}: missing key '{name}'")
        t = self._tensors[self._names[name]]
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists dims fastest-first
        try:
            if t.tensor_type.name in ("F32", "F16"):
                w = np.asarray(t.data)
            else:  # quantized blocks (and BF16, stored as raw 16-bit words) -> float32
                w = gguf.quants.dequantize(t.data, t.tensor_type)
            w = w.reshape(shape)
        except Exception as e:
            raise ConvertError(f"{self.path}: tensor {t.name} unreadable ({type(e).__name__}: {e})") from None
        heads = names.rotary_heads(names.names(self.config)[name][0], self.config)
        return w if heads is None else names.to_half_split(w, heads)

    # -- tokenizer --------------------------------------------------------------------------------

    @property
    def tokenizer_model(self) -> str | None:
        """"llama" (a SentencePiece vocabulary), "gpt2" (byte-level BPE), or None."""
        return self.meta.get("tokenizer.ggml.model")

    def tokenizer_config(self) -> dict[str, Any]:
        """Hugging Face tokenizer_config.json fields: special tokens, BOS/EOS habits, chat template."""
        tokens = self._field_list("tokenizer.ggml.tokens") or []
        cfg: dict[str, Any] = {}
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                          ("pad", "padding_token_id")):
            i = self.meta.get(f"tokenizer.ggml.{key}")
            if i is not None and 0 <= int(i) < len(tokens):
                cfg[f"{name}_token"] = tokens[int(i)]
                cfg[f"{name}_token_id"] = int(i)
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise.
        cfg["add_bos_token"] = bool(self.meta.get("tokenizer.ggml.add_bos_token", self.tokenizer_model == "llama"))
        cfg["add_eos_token"] = bool(self.meta.get("tokenizer.ggml.add_eos_token", False))
        if "tokenizer.chat_template" in self.meta:
            cfg["chat_template"] = self.meta["tokenizer.chat_template"]
        return cfg

    def sentencepiece_proto(self) -> bytes:
        """A SentencePiece model (serialized ModelProto) for a "llama" vocabulary."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        if self.tokenizer_model != "llama":
            raise ConvertError(f"{self.path}: tokenizer is {self.tokenizer_model!r}, not a SentencePiece vocabulary")
        tokens = self._field_list("tokenizer.ggml.tokens")
        scores = self._field_list("tokenizer.ggml.scores") or [0.0] * len(tokens)
        types = self._field_list("tokenizer.ggml.token_type") or [1] * len(tokens)
        m = pb.ModelProto()
        # GGUF token types use SentencePiece's numbering: 1 normal, 2 unknown, 3 control,
        # 4 user defined, 5 unused, 6 byte.
        for piece, score, kind in zip(tokens, scores, types):
            m.pieces.add(piece=piece, score=float(score), type=int(kind))
        ts = m.trainer_spec
        ts.model_type = pb.TrainerSpec.BPE
        ts.vocab_size = len(tokens)
        ts.byte_fallback = any(int(k) == 6 for k in types)
        # Encoding-time behaviour of LLaMA's tokenizer.model: whitespace runs may form one piece.
        ts.allow_whitespace_only_pieces = True
        ts.split_by_whitespace = True
        ts.unk_id = int(self.meta.get("tokenizer.ggml.unknown_token_id", 0))
        ts.bos_id = int(self.meta.get("tokenizer.ggml.bos_token_id", 1))
        ts.eos_id = int(self.meta.get("tokenizer.ggml.eos_token_id", 2))
        pad = self.meta.get("tokenizer.ggml.padding_token_id")
        ts.pad_id = int(pad) if pad is not None and 0 <= int(pad) < len(tokens) else -1
        ns = m.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = bool(self.meta.get("tokenizer.ggml.add_space_prefix", True))
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        return m.SerializeToString()

    def tokenizer_json(self) -> str:
        """A `tokenizers` tokenizer.json for a "gpt2" (byte-level BPE) vocabulary."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        if self.tokenizer_model != "gpt2":
            raise ConvertError(f"{self.path}: tokenizer is {self.tokenizer_model!r}, not a byte-level BPE vocabulary")
        tokens = self._field_list("tokenizer.ggml.tokens")
        types = self._field_list("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in self._field_list("tokenizer.ggml.merges") or []]
        vocab = {t: i for i, t in enumerate(tokens)}  # tokens are already spelled in the byte alphabet
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        pre = self.meta.get("tokenizer.ggml.pre", "default")
        if pre in _LLAMA3:
            split = _LLAMA3_SPLIT
        else:  # "gpt2", "default" and the StarCoder family use GPT-2's split
            if pre not in ("gpt2", "default") + _DIGITS_THEN_GPT2:
                import warnings

                warnings.warn(f"{self.path}: pre-tokenizer {pre!r} unknown here; splitting text as GPT-2 does "
                              "(ids may differ from llama.cpp's)", stacklevel=2)
            split = _GPT2_SPLIT
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        if pre in _DIGITS_THEN_GPT2:
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
        tok.decoder = decoders.ByteLevel()
        # Control tokens (type 3, e.g. <|im_start|>) match whole in text and are skipped by decode.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, types) if int(k) == 3])
        return tok.to_str()

    def write_tokenizer(self, out_dir: str | Path) -> list[Path]:
        """Write tokenizer.model (SentencePiece) or tokenizer.json (byte-level BPE), and
        tokenizer_config.json, into `out_dir`. Returns the files written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        if self.tokenizer_model == "llama":
            (out / "tokenizer.model").write_bytes(self.sentencepiece_proto())
            written.append(out / "tokenizer.model")
        elif self.tokenizer_model == "gpt2":
            (out / "tokenizer.json").write_text(self.tokenizer_json())
            written.append(out / "tokenizer.json")
        else:
            raise ConvertError(f"{self.path}: no tokenizer, or an unsupported kind ({self.tokenizer_model!r})")
        (out / "tokenizer_config.json").write_text(json.dumps(self.tokenizer_config(), indent=1))
        written.append(out / "tokenizer_config.json")
        return written


def is_gguf(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC
