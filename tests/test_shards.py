"""Token shards (llama_jax/shards.py, issue 27): tokenize round trip against the tokenizer itself, rows that
rebuild their documents, hosts reading disjoint documents, exact resume with prefetch running ahead, the
checks on states and index files, the `tokenize` command, and reading through a non-local epath backend."""

import contextlib
import itertools
import json
import os
import uuid
from collections import Counter

import fsspec
import numpy as np
import pytest
from conftest import LLAMA2_TOKENIZER
from etils import epath
from etils.epath import testing as epath_testing

from llama_jax import cli
from llama_jax.data import iter_documents, read_alpaca, read_documents
from llama_jax.shards import (
    ShardBatches,
    ShardSource,
    check_vocab,
    is_shards,
    read_index,
    tokenize,
    tokenizer_fingerprint,
)
from llama_jax.tokenizer import load_tokenizer

S, ROWS = 16, 4  # rows of 17 tokens, 4 a batch
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "mat", "hill", "river", "stone", "light", "dark",
         "quick", "slow", "old", "new", "red", "blue", "seven", "eleven", "Über", "naïve", "東京", "🙂"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(LLAMA2_TOKENIZER)


def _corpus(folder, n=40, seed=0):
    """A .jsonl of n random-word documents (a few longer than a row) and a .txt document; the documents
    in the order tokenize reads them."""
    rng = np.random.default_rng(seed)
    docs = [" ".join(rng.choice(WORDS, rng.integers(1, 45))) for _ in range(n)]
    assert len(set(docs)) == n  # distinct, so a document's identity is its text
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(3, "")  # blank lines are skipped
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    txt = "A plain text file is one document.\nIt has two lines.\n"
    (folder / "b.txt").write_text(txt)
    return [folder / "a.jsonl", folder / "b.txt"], docs + [txt]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok):
    """(shard folder, the documents' token ids in order) for a corpus tokenized into several shards."""
    d = tmp_path_factory.mktemp("corpus")
    inputs, docs = _corpus(d)
    tokenize(inputs, tok, d / "shards", shard_tokens=300, progress=False)
    return d / "shards", [tok.encode(doc, eos=True) for doc in docs]


def _take(batches, n):
    return [next(batches) for _ in range(n)]


def _split_at_bos(stream):
    """Documents from a stream of tokens: every Llama 2 document starts with BOS (1), and no text encodes to it."""
    starts = np.flatnonzero(np.asarray(stream) == 1).tolist() + [len(stream)]
    return [tuple(stream[a:b]) for a, b in itertools.pairwise(starts)]


def test_tokenize_round_trip(corpus, tok):
    path, docs = corpus
    index = read_index(path)
    assert index["documents"] == len(docs) and index["tokens"] == sum(map(len, docs))
    assert index["dtype"] == "uint16" and index["vocab_size"] == 32000 == tok.vocab_size
    assert index["tokenizer"] == tokenizer_fingerprint(tok) and index["encoding"]["eos_id"] == 2
    assert len(index["shards"]) > 3 and sum(s["documents"] for s in index["shards"]) == len(docs)
    assert all(s["tokens"] >= 300 for s in index["shards"][:-1])  # a shard closes once it holds shard_tokens
    names = sorted(os.listdir(path))
    assert "index.json" in names and not [n for n in names if n.endswith(".tmp")]
    source = ShardSource(path)
    assert len(source) == len(docs)
    for i, ids in enumerate(docs):
        got = source[i]
        assert got.dtype == np.int32 and got.tolist() == ids
    raw = np.fromfile(path / "shard-00000.tokens", "<u2")  # the format is what the docstring says
    offsets = np.fromfile(path / "shard-00000.offsets", "<i8")
    assert offsets[0] == 0 and offsets[-1] == len(raw) and raw[offsets[1]:offsets[2]].tolist() == docs[1]
    check_vocab(index, 32000)
    with pytest.raises(ValueError, match="vocabulary of 32000 tokens and the model's has 32064"):
        check_vocab(index, 32064)


def test_rows_rebuild_the_documents_epoch_by_epoch(corpus):
    path, docs = corpus
    total = sum(map(len, docs))
    batches = ShardBatches(path, S, ROWS, seed=1, prefetch=2, read_threads=2)
    assert batches.epoch == 0
    n = 2 * total // (ROWS * (S + 1)) + 2  # two epochs and a bit
    got = _take(batches, n)
    assert batches.epoch == 2  # the next row starts in the third epoch
    rows = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
    tokens, mask, seg, pos = rows["tokens"], rows["loss_mask"], rows["segment_ids"], rows["positions"]
    assert tokens.shape == (n * ROWS, S + 1) and mask.shape == seg.shape == pos.shape == (n * ROWS, S)
    assert all(v.dtype == np.int32 for v in rows.values())
    # Rows do not overlap: end to end they are the documents, each epoch all of them in its own order.
    stream = tokens.reshape(-1).tolist()
    epoch0, epoch1 = _split_at_bos(stream[:total]), _split_at_bos(stream[total:2 * total])
    assert sorted(epoch0) == sorted(epoch1) == sorted(map(tuple, docs))
    assert epoch0 != epoch1
    # Within a row: a new segment (positions from 0) exactly where a document starts; the loss counts
    # exactly the pairs inside one document, the last input's included when the row's last token continues it.
    starts = tokens[:, :S] == 1
    assert (seg > 0).all()  # an endless stream: no padding
    assert (seg[:, 0] == 1).all() and (np.diff(seg, axis=1) == starts[:, 1:]).all()
    new = starts.copy()
    new[:, 0] = True
    expected_pos = np.zeros_like(pos)
    for t in range(1, S):
        expected_pos[:, t] = np.where(new[:, t], 0, expected_pos[:, t - 1] + 1)
    np.testing.assert_array_equal(pos, expected_pos)
    np.testing.assert_array_equal(mask, (tokens[:, 1:] != 1).astype(np.int32))
    # The order is the seed's.
    again = _take(ShardBatches(path, S, ROWS, seed=1, prefetch=0), 3)
    other = _take(ShardBatches(path, S, ROWS, seed=2, prefetch=0), 3)
    assert all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(got, again))
    assert not all(np.array_equal(a["tokens"], b["tokens"]) for a, b in zip(got, other))


def _first_epoch(path, seq_len, process_index, process_count):
    """A host's documents of epoch 0: its stream up to the first document of epoch 1."""
    per_host = len(range(process_index, len(ShardSource(path)), process_count))
    batches = ShardBatches(path, seq_len, ROWS, seed=5, process_index=process_index, process_count=process_count)
    stream = []
    while stream.count(1) <= per_host:  # one BOS past this host's epoch: epoch 1 has begun
        stream += next(batches)["tokens"].reshape(-1).tolist()
    batches.close()
    return _split_at_bos(stream)[:per_host]


def test_hosts_read_disjoint_documents(corpus):
    path, docs = corpus
    host0, host1 = (_first_epoch(path, S, i, 2) for i in (0, 1))
    assert len(host0) + len(host1) == len(docs) and len(host0) - len(host1) in (0, 1)
    assert not set(host0) & set(host1)
    assert Counter(host0) + Counter(host1) == Counter(map(tuple, docs))


def test_resume_is_exact_with_prefetch_running_ahead(corpus):
    path, _ = corpus
    make = lambda: ShardBatches(path, S, ROWS, seed=3, prefetch=3, read_threads=2)
    reference = _take(make(), 14)
    for k in (0, 5, 9):  # 0: the state before any row, where no document spans a row edge
        interrupted = make()
        _take(interrupted, k)
        state = json.loads(json.dumps(interrupted.state_dict()))  # as the checkpoint stores it
        assert [b["tokens"].tolist() for b in _take(interrupted, 2)] == [b["tokens"].tolist()
                                                                         for b in reference[k:k + 2]]
        resumed = make()
        _take(resumed, 2)  # a position of its own, and prefetched batches, that the state replaces
        resumed.load_state_dict(state)
        for want, got in zip(reference[k:], _take(resumed, 14 - k)):
            assert want.keys() == got.keys()
            for key in want:
                np.testing.assert_array_equal(want[key], got[key])
        interrupted.close()
        resumed.close()


def test_state_mismatch_is_refused(corpus, tmp_path, tok):
    path, _ = corpus
    state = ShardBatches(path, S, ROWS, seed=0).state_dict()
    cases = [(ShardBatches(path, 32, ROWS, seed=0), "seq_len 16 \\(now 32\\)"),
             (ShardBatches(path, S, ROWS, seed=1), "seed 0 \\(now 1\\)"),
             (ShardBatches(path, S, ROWS, seed=0, process_index=1, process_count=2),
              "process_index 0 \\(now 1\\), process_count 1 \\(now 2\\)")]
    inputs, _ = _corpus(tmp_path, n=10, seed=7)
    tokenize(inputs, tok, tmp_path / "other", progress=False)
    cases.append((ShardBatches(tmp_path / "other", S, ROWS, seed=0), "another shard set"))
    for batches, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            batches.load_state_dict(state)
        assert "\n" not in str(e.value)
    same = ShardBatches(path, 2 * ROWS, ROWS, seed=0)
    with pytest.raises(ValueError, match="not one of token shards"):
        same.load_state_dict({"epoch": 0, "row": 0, "seed": 0, "fingerprint": "x"})  # data.Batches' state
    ShardBatches(path, S, 2 * ROWS, seed=0).load_state_dict(state)  # rows a step may change


class _Interrupted(Exception):
    pass


class _Failing:
    """The tokenizer, failing at its n-th document: a tokenize interrupted halfway."""

    def __init__(self, tok, n):
        self.tok, self.n = tok, n

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def encode(self, text, **kwargs):
        self.n -= 1
        if self.n < 0:
            raise _Interrupted
        return self.tok.encode(text, **kwargs)


def test_an_interrupted_or_broken_shard_set_is_refused(corpus, tmp_path, tok):
    inputs, _ = _corpus(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(_Interrupted):
        tokenize(inputs, _Failing(tok, 30), out, shard_tokens=300, progress=False)
    assert list(out.iterdir()) == []  # what was written is taken back: `out` is usable again
    assert not is_shards(out)
    # A kill leaves files but no index.json: still not a shard set.
    tokenize(inputs, tok, out, shard_tokens=300, progress=False)
    assert is_shards(out)
    index = json.loads((out / "index.json").read_text())
    (out / "index.json").unlink()
    assert not is_shards(out)
    with pytest.raises(ValueError, match="out: not a token shard set \\(no index.json"):
        ShardBatches(out, S, ROWS)

    def broken(change, message):
        bad = json.loads(json.dumps(index))
        change(bad)
        (out / "index.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=message):
            read_index(out)

    broken(lambda i: i.update(format="something-else/2"), "format 'something-else/2', not 'llama-jax-token-shards/1'")
    broken(lambda i: i.update(vocab_size=70000), "a vocabulary of 70000 tokens does not fit uint16")
    broken(lambda i: i["shards"].append({"name": "shard-00099", "documents": 1, "tokens": 1}),
           "shard file shard-00099.tokens is missing")
    (out / "index.json").write_text(json.dumps(index))
    assert read_index(out) == index
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        tokenize(inputs, tok, out, progress=False)


def test_jsonl_is_streamed_with_the_errors_read_documents_gave(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match="a.jsonl: not UTF-8 text \\(invalid start byte at byte 28\\)"):
        read_documents([path])
    path.write_bytes(b"\n  \n")
    with pytest.raises(ValueError, match="a.jsonl: empty file"):
        read_documents([path])
    (tmp_path / "b.txt").write_text("one document")
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):  # before a document is read
        iter_documents([tmp_path / "b.txt", tmp_path / "missing.txt"])


# ---------------------------------------------------------------------------------------------
# The command


def _cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip()


def _cli_error(capsys, *argv):
    rc, err = _cli(capsys, *argv)
    assert rc == 2 and "\n" not in err and "Traceback" not in err, err
    return err


def test_cli_tokenize(tmp_path, capsys, corpus):
    inputs, docs = _corpus(tmp_path)
    out = tmp_path / "out"
    base = ["tokenize", "--tokenizer", LLAMA2_TOKENIZER, "--no-progress"]
    rc, err = _cli(capsys, *base, "--data", *inputs, "--out", out, "--shard-tokens", 300)
    assert rc == 0, err
    index = read_index(out)
    assert err == f"llama-jax tokenize: {len(docs)} documents, {index['tokens']} tokens, {len(index['shards'])} " \
                  f"shards in {out}"
    assert index["shards"] == read_index(corpus[0])["shards"]  # the same documents as tokenize() made

    assert "exists and is not an empty folder" in _cli_error(capsys, *base, "--data", *inputs, "--out", out)
    fresh = tmp_path / "fresh"
    assert "missing.jsonl: no such file" in _cli_error(capsys, *base, "--data", tmp_path / "missing.jsonl",
                                                       "--out", fresh)
    assert "--shard-tokens must be >= 1, got 0" in _cli_error(capsys, *base, "--data", *inputs, "--out", fresh,
                                                               "--shard-tokens", 0)
    assert "nope.model: no such file" in _cli_error(capsys, "tokenize", "--tokenizer", tmp_path / "nope.model",
                                                    "--data", *inputs, "--out", fresh)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text"}\n')
    assert "bad.jsonl: line 3: field 'text' is missing" in _cli_error(capsys, *base, "--data", bad, "--out", fresh)
    assert not is_shards(fresh) and list(fresh.iterdir()) == []
    rc, err = _cli(capsys, *base, "--data", bad, "--out", fresh, "--text-key", "body")
    assert rc == 2 and "bad.jsonl: line 1: field 'body' is missing" in err


# ---------------------------------------------------------------------------------------------
# A non-local backend


@contextlib.contextmanager
def _memory_gcs():
    """gs:// served from memory: etils' mock_epath sends every epath call on a gs:// path to fsspec's
    in-memory file system (local paths go on to the disk). Yields the bucket's URL and that file system."""
    fs = fsspec.filesystem("memory")
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"

    def route(op):
        def call(original, path, *args, **kwargs):
            path = os.fspath(path)
            if not path.startswith("gs://"):
                return original(path, *args, **kwargs)
            return op("/" + path[len("gs://"):], *args, **kwargs)
        return call

    def listdir(p):
        return [os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False)]

    def stat(p):
        return epath.stat_utils.StatResult(is_directory=fs.isdir(p), length=fs.size(p), mtime=0)

    def makedirs(p, exist_ok=False):
        fs.makedirs(p, exist_ok=True)

    def move(p, dst, *args, **kwargs):
        fs.mv(p, "/" + os.fspath(dst)[len("gs://"):])

    ops = {"open": fs.open, "exists": fs.exists, "isdir": fs.isdir, "listdir": listdir, "stat": stat,
           "makedirs": makedirs, "mkdir": makedirs, "remove": fs.rm, "rename": move, "replace": move}
    try:
        with epath_testing.mock_epath(**{name: route(op) for name, op in ops.items()}):
            yield f"gs://{bucket}", fs
    finally:
        fs.rm(f"/{bucket}", recursive=True)


def test_tokenize_and_read_through_a_non_local_backend(tmp_path, tok, corpus):
    inputs, docs = _corpus(tmp_path)
    with _memory_gcs() as (bucket, fs):
        for f in inputs:
            (epath.Path(bucket) / "text" / f.name).write_bytes(f.read_bytes())
        remote = [f"{bucket}/text/{f.name}" for f in inputs]
        assert read_documents(remote) == docs
        (epath.Path(bucket) / "alpaca.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "hi"}]))
        assert read_alpaca(f"{bucket}/alpaca.json") == [{"instruction": "Say hi.", "input": "", "output": "hi"}]
        index = tokenize(remote, tok, f"{bucket}/shards", shard_tokens=300, progress=False)
        assert fs.exists(f"{bucket[len('gs:/'):]}/shards/index.json")  # written to the backend, nothing on disk
        assert is_shards(f"{bucket}/shards") and read_index(f"{bucket}/shards") == index
        assert index["shards"] == read_index(corpus[0])["shards"] and index["inputs"] == remote
        source = ShardSource(f"{bucket}/shards")
        assert not source.local  # range reads through epath, not os.pread on a local file
        assert [source[i].tolist() for i in range(len(source))] == [tok.encode(d, eos=True) for d in docs]
        local = _take(ShardBatches(corpus[0], S, ROWS, seed=4, read_threads=3), 6)
        remote_batches = ShardBatches(f"{bucket}/shards", S, ROWS, seed=4, read_threads=3)
        for want, got in zip(local, _take(remote_batches, 6)):
            for key in want:
                np.testing.assert_array_equal(want[key], got[key])
        remote_batches.close()


def test_a_runs_small_files_through_a_non_local_backend(tok):
    """What a training run writes beside Orbax's arrays (the tokenizer, metrics.jsonl) goes through epath,
    and a URI stays a URI (pathlib's Path("gs://b/run").absolute() made it <cwd>/gs:/b/run)."""
    from llama_jax.checkpoints import MetricsLog, orbax_io

    with _memory_gcs() as (bucket, fs):
        run = orbax_io.as_path(f"{bucket}/run")
        assert str(run / "7" / "state") == f"{bucket}/run/7/state"
        tok.save(run)
        assert orbax_io.has_tokenizer(run) and fs.exists(f"{bucket[len('gs:/'):]}/run/tokenizer.model")
        metrics = MetricsLog(run / "metrics.jsonl")
        metrics.keep_up_to(0)
        for step in range(1, 151):  # an object store cannot append: rewritten whole every 100 rows
            metrics.write({"step": step, "loss": 1 / step})
            if step == 120:
                assert len((run / "metrics.jsonl").read_text().splitlines()) == 100
        metrics.close()
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 151))
        resumed = MetricsLog(run / "metrics.jsonl")
        resumed.keep_up_to(120)  # a run resumed from step 120 logs the steps after it again
        resumed.close()
        assert len((run / "metrics.jsonl").read_text().splitlines()) == 120
    assert str(orbax_io.as_path("runs/x")) == os.path.abspath("runs/x")
