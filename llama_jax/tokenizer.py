"""Tokenizers behind one interface, and prompt templates.

    tok = load_tokenizer("tokenizer.model" | "tokenizer.json" | "model.gguf" | "checkpoint_dir")
    ids = tok.encode("Hello", bos=None, eos=False)   # bos=None: the model's own habit (add_bos_token)
    text = tok.decode(ids)                           # special tokens (BOS, EOS, <|im_end|>) dropped
    tok.bos_id, tok.eos_id, tok.vocab_size, tok.chat_template

Backends: SentencePiece (LLaMA 1/2 `tokenizer.model`, SentencePiece vocabularies inside GGUF files)
and byte-level BPE through the `tokenizers` library (tokenizer.json, GGUF "gpt2" vocabularies).

Templates: `llama2_chat_prompt` (Meta's [INST] / <<SYS>> format), `alpaca_prompt` (Stanford Alpaca),
and `chat_tokens`, which uses the model's own chat template (jinja2) when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from etils import epath

from checkpoints_convert.gguf import GGUFReader, is_gguf


class Tokenizer:
    """The common interface. Subclasses implement `_encode(text) -> ids` and `_decode(ids) -> text`."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    add_bos: bool = True  # whether encode adds BOS by default (LLaMA: yes; SmolLM2: no)
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""

    def encode(self, text: str, bos: bool | None = None, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise ValueError(f"encode expects a str, got {type(text).__name__}")
        ids = self._encode(text)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos and self.eos_id is not None:
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode([int(i) for i in ids])

    def _apply_config(self, config: dict[str, Any]) -> None:
        """Fields of a tokenizer_config.json (or a GGUF's equivalent)."""
        if "add_bos_token" in config:
            self.add_bos = bool(config["add_bos_token"])
        if config.get("chat_template"):
            template = config["chat_template"]
            if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
                named = {t.get("name"): t.get("template") for t in template}
                template = named.get("default") or next(iter(named.values()))
            self.chat_template = template
        for name in ("bos", "eos"):
            token = config.get(f"{name}_token")
            if isinstance(token, dict):  # AddedToken serialized
                token = token.get("content")
            if isinstance(token, str):
                setattr(self, f"{name}_token", token)
                i = self._token_to_id(token)
                if i is not None:
                    setattr(self, f"{name}_id", i)

    def _token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def save(self, folder: str | Path) -> list[Path]:
        """Write this tokenizer into `folder` as load_tokenizer reads it back: its model file
        (tokenizer.model or tokenizer.json) and a tokenizer_config.json of the settings above. A
        training run keeps its tokenizer this way, so its folder is a model on its own."""
        folder = epath.Path(folder)  # a run folder may live on gs://
        files = [self._save_model(folder)]
        config = {"add_bos_token": self.add_bos, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "bos_token_id": self.bos_id, "eos_token_id": self.eos_id}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        files.append(folder / "tokenizer_config.json")
        files[-1].write_text(json.dumps(config, indent=1))
        return files

    def _save_model(self, folder: Path) -> Path:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, model: str | Path | bytes, config: dict[str, Any] | None = None):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            if isinstance(model, bytes):
                self.sp.LoadFromSerializedProto(model)
            else:
                self.sp.Load(str(model))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model if not isinstance(model, bytes) else 'SentencePiece model'}: "
                             f"not a SentencePiece model ({e})") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.bos_token = self.sp.IdToPiece(self.bos_id) if self.bos_id is not None else ""
        self.eos_token = self.sp.IdToPiece(self.eos_id) if self.eos_id is not None else ""
        self._apply_config(config or {})

    def _encode(self, text):
        return self.sp.EncodeAsIds(text)

    def _decode(self, ids):
        return self.sp.DecodeIds(ids)  # control pieces (BOS/EOS) decode to ""

    def _save_model(self, folder):
        (folder / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        return folder / "tokenizer.model"

    def _token_to_id(self, token):
        i = self.sp.PieceToId(token)
        return None if i == self.sp.unk_id() and token != self.sp.IdToPiece(i) else i


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) through the `tokenizers` library."""

    def __init__(self, tokenizer_json: str | Path, config: dict[str, Any] | None = None, from_string=False):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.json = tokenizer_json if from_string else Path(tokenizer_json).read_text()  # for save()
            self.tk = HFTokenizer.from_str(self.json)
        except Exception as e:
            where = "tokenizer.json" if from_string else str(tokenizer_json)
            raise ValueError(f"{where}: not a tokenizers tokenizer.json ({e})") from None
        # BOS/EOS are added by encode() alone, but the file's post-processor tells whether the model
        # expects BOS (Llama 3's tokenizer.json prepends <|begin_of_text|>; its config does not say).
        plain = self.tk.encode("a", add_special_tokens=False).ids
        processed = self.tk.encode("a", add_special_tokens=True).ids
        prepended = processed[0] if len(processed) > len(plain) and processed[1:len(plain) + 1] == plain else None
        self.tk.post_processor = None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.eos_id = None
        self.add_bos = prepended is not None
        if prepended is not None:
            self.bos_id, self.bos_token = prepended, self.tk.id_to_token(prepended)
        self._apply_config(config or {})

    def _encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids):
        return self.tk.decode(ids, skip_special_tokens=True)

    def _save_model(self, folder):
        (folder / "tokenizer.json").write_text(self.json)
        return folder / "tokenizer.json"

    def _token_to_id(self, token):
        return self.tk.token_to_id(token)


# ---------------------------------------------------------------------------------------------
# Loading


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _folder_config(folder: Path) -> dict:
    """tokenizer_config.json, with BOS/EOS ids from config.json / generation_config.json as fallbacks."""
    config = _read_json(folder / "tokenizer_config.json")
    for name in ("config.json", "generation_config.json"):
        extra = _read_json(folder / name)
        for key in ("bos_token_id", "eos_token_id"):
            if key in extra and key not in config:
                config[key] = extra[key]
    return config


def _finish(tok: Tokenizer, config: dict) -> Tokenizer:
    # Explicit ids (config.json) beat nothing; a token string in tokenizer_config.json was applied already.
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None and getattr(tok, key[:-len("_token_id")] + "_id") is None:
            setattr(tok, key[:-len("_token_id")] + "_id", int(value))
    return tok


def tokenizer_from_gguf(reader) -> Tokenizer:
    """The tokenizer stored in a GGUF file's metadata (a checkpoints_convert GGUFReader)."""
    config = reader.tokenizer_config()
    if reader.tokenizer_model == "llama":
        tok = SentencePieceTokenizer(reader.sentencepiece_proto(), config)
    elif reader.tokenizer_model == "gpt2":
        tok = BPETokenizer(reader.tokenizer_json(), config, from_string=True)
    else:
        raise ValueError(f"{reader.path}: no tokenizer, or an unsupported kind ({reader.tokenizer_model!r})")
    return _finish(tok, config)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer.model, a tokenizer.json, a GGUF file, or a folder (checkpoint / Hugging Face)
    holding one of them."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        config = _folder_config(path)
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).is_file():
                return _finish(_load_file(path / name, config), config)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return tokenizer_from_gguf(GGUFReader(ggufs[0]))
        raise ValueError(f"{path}: no tokenizer.model, tokenizer.json or single .gguf file in this folder")
    if is_gguf(path):
        return tokenizer_from_gguf(GGUFReader(path))
    config = _folder_config(path.parent)
    return _finish(_load_file(path, config), config)


def _load_file(path: Path, config: dict) -> Tokenizer:
    if path.suffix == ".json":
        return BPETokenizer(path, config)
    return SentencePieceTokenizer(path, config)


# ---------------------------------------------------------------------------------------------
# Templates

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def _check_messages(messages: Sequence[dict]) -> list[dict]:
    messages = list(messages)
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise ValueError(f"chat messages are dicts with role system|user|assistant and str content; got {m!r}")
    return messages


def llama2_chat_tokens(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Meta's Llama-2 chat format as token ids: each finished (user, assistant) exchange is
    BOS + "[INST] user [/INST] answer " + EOS; the last user turn is BOS + "[INST] user [/INST]".
    A system message is folded into the first user turn inside <<SYS>> ... <</SYS>>."""
    messages = _check_messages(messages)
    if messages and messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
        first = dict(messages[1], content=B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"])
        messages = [first] + messages[2:]
    ids: list[int] = []
    for i in range(0, len(messages), 2):
        user = messages[i]
        answer = messages[i + 1] if i + 1 < len(messages) else None
        if user["role"] != "user" or (answer is not None and answer["role"] != "assistant"):
            raise ValueError("Llama-2 chat alternates user and assistant messages, starting with user")
        if answer is None:
            ids += tok.encode(f"{B_INST} {user['content'].strip()} {E_INST}", bos=True)
        else:
            ids += tok.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                              bos=True, eos=True)
    return ids


def llama2_chat_prompt(messages: Sequence[dict]) -> str:
    """The same format as text, with <s> and </s> written out (for display and for tokenizers that
    parse them as special tokens)."""
    messages = _check_messages(messages)
    if messages and messages[0]["role"] == "system":
        messages = [dict(messages[1], content=B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"])] \
            + messages[2:]
    out = ""
    for i in range(0, len(messages), 2):
        user = messages[i]["content"].strip()
        if i + 1 < len(messages):
            out += f"<s>{B_INST} {user} {E_INST} {messages[i + 1]['content'].strip()} </s>"
        else:
            out += f"<s>{B_INST} {user} {E_INST}"
    return out


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Stanford Alpaca's prompt; the response follows it directly (the loss covers only that)."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def render_chat_template(tok: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The model's own chat template (jinja2, as Hugging Face renders it) applied to messages."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if not tok.chat_template:
        raise ValueError("this tokenizer has no chat template")

    def raise_exception(message):
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(tok.chat_template)
        return template.render(messages=_check_messages(messages), add_generation_prompt=add_generation_prompt,
                               bos_token=tok.bos_token, eos_token=tok.eos_token)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template: {e}") from None


def chat_tokens(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn: the model's own template
    when it has one, else Llama-2's."""
    if not tok.chat_template:
        return llama2_chat_tokens(tok, messages)
    text = render_chat_template(tok, messages, add_generation_prompt=True)
    # Templates write BOS as text; SentencePiece would spell "<s>" out as characters, so take it off
    # and add the id instead.
    bos = tok.bos_token and text.startswith(tok.bos_token)
    if bos:
        text = text[len(tok.bos_token):]
    return tok.encode(text, bos=True if bos else None)
