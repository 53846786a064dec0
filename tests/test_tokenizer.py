"""Tokenizers and templates, against transformers' tokenizer (SmolLM2's GGUF vocabulary) and
sentencepiece itself (LLaMA-2's tokenizer.model)."""

import pytest

from llama_jax.tokenizer import (
    ALPACA_NO_INPUT, BPETokenizer, SentencePieceTokenizer, alpaca_prompt, chat_tokens, llama2_chat_prompt,
    llama2_chat_tokens, load_tokenizer)
from conftest import LLAMA2_TOKENIZER, STORIES_GGUF, smollm2_path

TEXTS = [
    "",
    "The capital of France is",
    "Hello, world!",
    " leading space",
    "trailing spaces   ",
    "runs   of    spaces and\n\nnewlines\n\n\n end",
    "\ttabs\tand\r\nwindows lines",
    "digits 0123456789, 3.14159, 1,000,000 and 42nd",
    "unicode: héllo wörld, naïve café, Größe, ñandú",
    "日本語のテキストと中文文本",
    "emoji 🎉🚀 and symbols ∑∫√ ≤ ≥ € £",
    "Ελληνικά и русский текст",
    "code: def f(x):\n    return x ** 2  # square",
    "   ",
    "\n",
]


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer(smollm2_path())


@pytest.fixture(scope="module")
def smollm2_hf():
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def test_smollm2_ids_equal_transformers(smollm2, smollm2_hf):
    assert isinstance(smollm2, BPETokenizer)
    assert smollm2.encode("The capital of France is") == [504, 3575, 282, 4649, 314]  # the ids llama.cpp gives; no BOS
    for text in TEXTS:
        assert smollm2.encode(text) == smollm2_hf.encode(text, add_special_tokens=False), repr(text)
        assert smollm2.decode(smollm2.encode(text)) == text, repr(text)
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.vocab_size) == (
        smollm2_hf.bos_token_id, smollm2_hf.eos_token_id, 49152) == (1, 2, 49152)


def test_llama2_ids_equal_sentencepiece():
    import sentencepiece as spm

    tok = load_tokenizer(LLAMA2_TOKENIZER)
    ref = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 32000)
    for text in TEXTS:
        assert tok.encode(text) == [1] + ref.encode(text), repr(text)  # LLaMA adds BOS
        assert tok.encode(text, bos=False, eos=True) == ref.encode(text) + [2]
        assert tok.decode(tok.encode(text, eos=True)) == ref.decode(ref.encode(text))
    for text in TEXTS:
        if not text.startswith(" "):  # SentencePiece drops one leading space on decode, by design
            assert tok.decode(tok.encode(text)) == text, repr(text)


def test_stories_gguf_tokenizer():
    # transformers cannot build this file's tokenizer (its pad id is 2**32 - 1); the SentencePiece
    # rebuild itself is checked against sentencepiece in test_gguf. Here: ids the model knows.
    tok = load_tokenizer(STORIES_GGUF)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.add_bos) == (1, 2, 512, True)
    for text in ["Once upon a time, there was a little girl named Lily.", "Tom and Sue  played.\nThe end.", "Zoë 42"]:
        ids = tok.encode(text)
        assert ids[0] == 1 and tok.decode(ids) == text


def test_load_tokenizer_from_files_and_folders(tmp_path, smollm2):
    import shutil

    from checkpoints_convert.gguf import GGUFReader

    # A folder with tokenizer.json + tokenizer_config.json (what the converter writes).
    GGUFReader(smollm2_path()).write_tokenizer(tmp_path / "ckpt")
    from_folder = load_tokenizer(tmp_path / "ckpt")
    from_json = load_tokenizer(tmp_path / "ckpt" / "tokenizer.json")
    for tok in (from_folder, from_json):
        assert tok.encode("Hi there 123") == smollm2.encode("Hi there 123")
        assert (tok.eos_id, tok.add_bos) == (2, False) and tok.chat_template == smollm2.chat_template
    shutil.copy(LLAMA2_TOKENIZER, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).encode("hi") == load_tokenizer(LLAMA2_TOKENIZER).encode("hi")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "junk.model").write_bytes(b"\x00not a model")
    with pytest.raises(ValueError, match="junk.model"):
        load_tokenizer(tmp_path / "junk.model")


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


def test_smollm2_chat_template_equals_transformers(smollm2, smollm2_hf):
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        expected = smollm2_hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = chat_tokens(smollm2, messages)
        assert smollm2_hf.decode(ids) == expected
        assert ids == smollm2_hf.encode(expected, add_special_tokens=False)
        assert ids[-4:] == smollm2.encode("<|im_start|>assistant\n")


def test_llama2_chat_format():
    """Meta's reference format (llama/generation.py): the text, and BOS/EOS as ids around each exchange."""
    tok = load_tokenizer(LLAMA2_TOKENIZER)
    text = llama2_chat_prompt(CONVERSATION)
    assert text == ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. </s>"
                    "<s>[INST] And 3+3? [/INST]")
    ids = llama2_chat_tokens(tok, CONVERSATION)
    first = tok.encode("[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nWhat is 2+2? [/INST] 4. ", bos=True, eos=True)
    assert ids == first + tok.encode("[INST] And 3+3? [/INST]", bos=True)
    assert ids.count(1) == 2 and ids.count(2) == 1
    assert chat_tokens(tok, CONVERSATION) == ids  # no template of its own: Llama-2's
    with pytest.raises(ValueError):
        llama2_chat_tokens(tok, [{"role": "assistant", "content": "hi"}])


def test_alpaca_prompt():
    # Stanford Alpaca's templates, written out.
    assert alpaca_prompt("Name a colour.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    assert alpaca_prompt("Translate.", "bonjour") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n"
        "### Input:\nbonjour\n\n### Response:\n")
    assert alpaca_prompt("x", "") == ALPACA_NO_INPUT.format(instruction="x")


def test_tokenizer_json_post_processor_decides_bos(tmp_path):
    """A Llama-3-style tokenizer.json whose post-processor prepends BOS (and no tokenizer_config
    saying so): encode adds BOS exactly as the tokenizers library's own encode does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "h": 2, "i": 3, "hi": 4, "Ġ": 5, "Ġhi": 6}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "i"), ("Ġ", "hi")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    for text in ["hi hi", "ih", ""]:
        assert tok.encode(text) == tk.encode(text).ids
        assert tok.encode(text, bos=False) == tk.encode(text, add_special_tokens=False).ids
    assert tok.bos_id == 0
