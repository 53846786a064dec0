"""Data pipelines: packed pretraining rows (segments, positions, masks, order, resume), Alpaca records
(templates, response-only loss, padded = packed), and one-line errors for bad input, from the CLI too."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax as lj
from llama_jax import cli, train
from llama_jax.data import (Batches, InstructionRows, PackedText, encode_alpaca, read_alpaca, read_documents)
from conftest import LLAMA2_TOKENIZER, STORIES_GGUF


def _docs(n=12, seed=0):
    rng = np.random.default_rng(seed)
    return [[1] + rng.integers(3, 200, size=rng.integers(2, 25)).tolist() + [2] for _ in range(n)]


def test_packed_rows_hold_every_document_once_with_restarting_positions():
    docs = _docs()
    s = 16
    rows = PackedText(docs, seq_len=s, seed=3).epoch(0)
    tokens, mask, seg, pos = rows["tokens"], rows["loss_mask"], rows["segment_ids"], rows["positions"]
    assert tokens.shape[1] == s + 1 and mask.shape == seg.shape == pos.shape == (len(tokens), s)
    # Rows overlap by one token: their first s tokens, end to end, are all documents in some order.
    stream = tokens[:, :-1].reshape(-1)
    total = sum(map(len, docs))
    assert sorted(map(tuple, docs)) == sorted(_split_at_bos(stream[:total].tolist()))
    # Each within-document (input, target) pair is counted exactly once; none across documents.
    assert mask.sum() == sum(len(d) - 1 for d in docs)
    for r in range(len(tokens)):
        for t in range(s):
            if seg[r, t] == 0:
                assert mask[r, t] == 0
                continue
            new_segment = t == 0 or seg[r, t] != seg[r, t - 1]
            assert pos[r, t] == (0 if new_segment else pos[r, t - 1] + 1)
            if mask[r, t]:
                assert tokens[r, t + 1] != 1  # never asked to predict the next document's BOS
            elif t + 1 < s and seg[r, t + 1] == seg[r, t]:
                pytest.fail(f"row {r} position {t}: a pair inside one segment is masked")


def _split_at_bos(ids):
    docs, cur = [], []
    for i in ids:
        if i == 1 and cur:
            docs.append(tuple(cur))
            cur = []
        cur.append(i)
    return docs + [tuple(cur)]


def test_packed_row_logits_equal_each_document_alone():
    """Segments and restarted positions make a packed row compute exactly what separate rows would."""
    cfg = lj.PRESETS["tiny"]
    params = lj.init_params(cfg, jax.random.key(0))
    docs = [d[:20] for d in _docs(4, seed=1)]
    rows = PackedText(docs, seq_len=sum(map(len, docs)), seed=0).epoch(0)
    assert rows["segment_ids"][0].max() == 4
    packed = lj.model.apply(params, jnp.asarray(rows["tokens"][:1, :-1]), cfg, positions=rows["positions"][:1],
                            segment_ids=rows["segment_ids"][:1])[0][0]
    seg = rows["segment_ids"][0]
    for k in range(1, 5):
        ids = rows["tokens"][0, :-1][seg == k]
        alone = lj.forward(params, jnp.asarray(ids)[None], cfg)[0]
        np.testing.assert_allclose(packed[seg == k], alone, atol=1e-5)


def test_order_is_deterministic_from_the_seed_and_changes_per_epoch():
    docs = _docs(30)
    a = PackedText(docs, 16, seed=0)
    assert np.array_equal(a.epoch(0)["tokens"], PackedText(docs, 16, seed=0).epoch(0)["tokens"])
    assert not np.array_equal(a.epoch(0)["tokens"], PackedText(docs, 16, seed=1).epoch(0)["tokens"])
    assert not np.array_equal(a.epoch(0)["tokens"], a.epoch(1)["tokens"])


@pytest.mark.parametrize("kind", ["packed_text", "instructions"])
def test_batches_resume_from_their_state(kind):
    if kind == "packed_text":
        source = PackedText(_docs(30), 16, seed=0)
    else:
        source = InstructionRows([(np.arange(1, n + 2), 2) for n in range(3, 20)], seed=0, pack=True)
    straight = Batches(source, 3)
    ref = [next(straight) for _ in range(12)]  # runs over several epochs
    assert straight.epoch >= 1
    first = Batches(source, 3)
    for _ in range(5):
        next(first)
    position = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    resumed = Batches(source, 3)
    resumed.load_state_dict(position)
    for want in ref[5:]:
        got = next(resumed)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])


def test_resume_with_other_data_is_refused():
    position = Batches(PackedText(_docs(30), 16, seed=0), 3).state_dict()
    with pytest.raises(ValueError, match="differ from those the checkpoint"):
        Batches(PackedText(_docs(31), 16, seed=0), 3).load_state_dict(position)
    with pytest.raises(ValueError, match="differ from those the checkpoint"):
        Batches(PackedText(_docs(30), 32, seed=0), 3).load_state_dict(position)


# ---------------------------------------------------------------------------------------------
# Alpaca

# Stanford Alpaca's two prompts, as published with the dataset (written out here independently).
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
              "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
              "### Input:\n{input}\n\n### Response:\n")
NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."},
    {"instruction": "Translate the sentence to French.", "input": "The cat sleeps.", "output": "Le chat dort."},
    {"instruction": "Name a primary colour.", "output": "Red."},
]


@pytest.fixture(scope="module")
def llama2_tok():
    return lj.load_tokenizer(LLAMA2_TOKENIZER)


def test_alpaca_examples_are_template_then_response(llama2_tok):
    tok = llama2_tok
    for rec, (ids, n_prompt) in zip(RECORDS, encode_alpaca(RECORDS, tok, max_len=512)):
        template = WITH_INPUT if rec.get("input") else NO_INPUT
        prompt = template.format(instruction=rec["instruction"], input=rec.get("input", ""))
        assert ids.tolist() == tok.encode(prompt, bos=True) + tok.encode(rec["output"], bos=False, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and n_prompt == len(tok.encode(prompt, bos=True))


def test_alpaca_truncation_and_dropped_records(llama2_tok):
    full = encode_alpaca(RECORDS, llama2_tok, max_len=512)  # 73, 70 and 44 tokens; prompts 46, 65, 41
    cut = encode_alpaca(RECORDS, llama2_tok, max_len=66)
    assert [len(ids) for ids, _ in cut] == [66, 66, 44]
    for (a, na), (b, nb) in zip(full, cut):
        assert na == nb and np.array_equal(a[:len(b)], b)  # the end of the response goes first
    # A prompt that fills max_len leaves nothing to learn: the record is dropped.
    assert len(encode_alpaca(RECORDS, llama2_tok, max_len=65)) == 2
    with pytest.raises(ValueError, match="no response tokens left"):
        encode_alpaca(RECORDS[1:2], llama2_tok, max_len=60)


def test_padded_and_packed_instruction_rows_give_the_same_loss(llama2_tok):
    examples = encode_alpaca(RECORDS * 3, llama2_tok, max_len=512)
    cfg = lj.PRESETS["tiny"].replace(vocab_size=32000)
    params = lj.init_params(cfg, jax.random.key(0))
    padded = InstructionRows(examples, seed=0, pack=False).epoch(0)
    packed = InstructionRows(examples, seed=0, pack=True, max_len=128).epoch(0)
    assert len(packed["tokens"]) < len(padded["tokens"])  # packing saved rows
    assert "segment_ids" not in padded  # right padding needs no segments (causal attention)
    sums = jax.jit(train.loss_sums, static_argnames="cfg")
    t_pad, n_pad = sums(params, padded, cfg=cfg)
    t_pack, n_pack = sums(params, packed, cfg=cfg)
    assert n_pad == n_pack == sum(len(ids) - n for ids, n in examples)
    assert abs(float(t_pad) - float(t_pack)) < 1e-4 * float(t_pad)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_document_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt: no such file"):
        read_documents([tmp_path / "nope.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt: empty file"):
        read_documents([tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl: line 2: not valid JSON"):
        read_documents([tmp_path / "bad.jsonl"])
    (tmp_path / "field.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    with pytest.raises(ValueError, match="field.jsonl: line 2: field 'text' is missing"):
        read_documents([tmp_path / "field.jsonl"])
    (tmp_path / "ok.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (tmp_path / "ok.txt").write_text("three\nfour\n")
    assert read_documents([tmp_path / "ok.jsonl", tmp_path / "ok.txt"]) == ["one", "two", "three\nfour\n"]


@pytest.mark.parametrize("records,message", [
    ({"instruction": "x"}, "expected a JSON list"),
    ([], "no records"),
    ([RECORDS[0], "text"], "record 1: expected an object"),
    ([RECORDS[0], RECORDS[1], {"instruction": "x"}], "record 2: field 'output' is missing"),
    ([RECORDS[0], {"instruction": "x", "input": 3, "output": "y"}], "record 1: field 'input' must be a string"),
    ([{"instruction": " ", "output": "y"}], "record 0: field 'instruction' is empty"),
])
def test_alpaca_errors_name_record_and_field(tmp_path, records, message):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=message) as e:
        read_alpaca(path)
    assert str(path) in str(e.value)


def test_alpaca_invalid_json(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"instruction": "x", "output": "y"},')
    with pytest.raises(ValueError, match="a.json: not valid JSON"):
        read_alpaca(path)
    assert len(read_alpaca(_write(tmp_path / "b.jsonl", "\n".join(json.dumps(r) for r in RECORDS)))) == 3


def _write(path, text):
    path.write_text(text)
    return path


def _cli_error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    text = _write(tmp_path / "a.txt", "Some text to train on.\n" * 20)
    out = str(tmp_path / "run")
    base = ["train", "--model", "tiny", "--tokenizer", str(STORIES_GGUF), "--out", out, "--steps", "2"]
    err = _cli_error(capsys, base + ["--data", str(tmp_path / "missing.txt"), "--seq-len", "32", "--batch", "8"])
    assert "missing.txt: no such file" in err
    _write(tmp_path / "empty.txt", "")
    err = _cli_error(capsys, base + ["--data", str(tmp_path / "empty.txt"), "--seq-len", "32", "--batch", "8"])
    assert "empty.txt: empty file" in err
    err = _cli_error(capsys, base + ["--data", str(text), "--seq-len", "4096", "--batch", "8"])
    assert "--seq-len 4096 is above the model's context of 128 tokens" in err
    # 8 fake devices: the default mesh puts all of them on fsdp.
    err = _cli_error(capsys, base + ["--data", str(text), "--seq-len", "32", "--batch", "4"])
    assert "--batch 4 does not divide over the 8 data-parallel shards" in err
    err = _cli_error(capsys, base + ["--data", str(text), "--seq-len", "32", "--batch", "16", "--micro-batch", "12"])
    assert "--batch 16 is not a multiple of --micro-batch 12" in err
    err = _cli_error(capsys, ["train", "--model", "tiny", "--data", str(text), "--seq-len", "32", "--batch", "8",
                              "--steps", "2", "--out", out])
    assert "give --tokenizer" in err

    alpaca = _write(tmp_path / "alpaca.json", json.dumps([RECORDS[0], {"instruction": "x", "output": 5}]))
    ft = ["finetune", "--model", str(STORIES_GGUF), "--out", out]
    err = _cli_error(capsys, ft + ["--data", str(alpaca)])
    assert "alpaca.json: record 1: field 'output' must be a string" in err
    good = _write(tmp_path / "good.json", json.dumps(RECORDS))
    err = _cli_error(capsys, ft + ["--data", str(good), "--max-len", "4096"])
    assert "--max-len 4096 is above the model's context of 2048 tokens" in err
    err = _cli_error(capsys, ft + ["--data", str(good), "--batch", "12"])
    assert "--batch 12 does not divide over the 8 data-parallel shards" in err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("[0-9]*"))
