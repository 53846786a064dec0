"""Pretraining data at pod scale: a corpus tokenized once into token shards, read back per host with Grain.

    index = tokenize(["a.jsonl", "gs://bucket/b.jsonl"], tok, "gs://bucket/shards")    # `llama-jax tokenize`
    batches = ShardBatches("gs://bucket/shards", seq_len=2048, rows=16, seed=0,
                           process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(batches)         # numpy dict like data.PackedText's rows: tokens [rows, S+1] int32,
                                  # loss_mask, segment_ids, positions [rows, S] int32
    state = batches.state_dict()  # JSON, into the checkpoint; batches.load_state_dict(state) resumes exactly

The format. A shard set is a folder (local, gs:// or any other etils.epath backend):

    shard-00000.tokens    the documents' token ids end to end: raw little-endian uint16 (vocabulary
                          <= 65536) or uint32
    shard-00000.offsets   int64, documents + 1 entries: document d is tokens[offsets[d]:offsets[d + 1]]
    ...
    index.json            written last: format tag, dtype, vocabulary size, tokenizer fingerprint, each
                          shard's documents and tokens, the totals, and how the documents were encoded

Every file is written under a temporary name and renamed once complete, index.json last: a folder
without index.json (a tokenize that was interrupted) is never taken for a shard set.

Why flat arrays and not ArrayRecord (Grain's usual format): ArrayRecord reads through its own C++ file
layer, which reaches GCS through a gcsfuse mount. These files are read by byte range through
etils.epath, so local paths, gs:// and any epath backend read alike with no mount (a seek and a read on
the backend's file object); local files take a fast path, os.pread on one descriptor per file. A
document costs two small reads, its two offsets then its tokens, and nothing per document is held in
memory: a host's memory does not grow with the corpus, tokenizing or reading (bench/data_rss.py).
Local files are not np.memmap'd, though that would save a copy: every page a read touches stays mapped
and counts in the process's RSS (with the kernel's fault-around, ~100 KB a document), so RSS grew with
the data read, 260 -> 409 MiB for 200 batches of 8 x 2049 from a 20 vs a 200 MB corpus, where os.pread
leaves the pages to the page cache.

Reading. `ShardSource` is a Grain random-access source over every document of a set. `ShardBatches`
shuffles them per epoch (Grain's index shuffle: O(1) memory, a new order each epoch, fixed by the seed),
keeps this host's share (the documents at places i % process_count == process_index of the shuffled
order, so hosts read disjoint documents), packs them into rows (concatenate then split, Grain's
ConcatThenSplit), batches `rows` rows (this host's rows of a step) and prefetches in a background thread.

Rows are laid out as data.PackedText's (the train step reads either) with one difference: they do not
overlap. Each row is S + 1 new tokens, so the pair across a row's edge (a row's last token, the next
row's first) is never a target: one target in S + 1 is lost, where PackedText's rows overlap by one
token and lose none. The position is Grain's, and it resumes exactly, prefetching or not.
"""

from __future__ import annotations

import collections
import hashlib
import json
import operator
import os
import sys
import tempfile
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path

import grain
import numpy as np
from etils import epath
from tqdm import tqdm

from llama_jax.data import iter_documents

FORMAT = "llama-jax-token-shards/1"  # index.json's format tag
STATE_FORMAT = "llama-jax-shard-batches/1"  # state_dict()'s
SHARD_TOKENS = 1 << 28  # tokens a shard holds (about): 512 MiB of uint16
_WRITE_TOKENS = 1 << 20  # tokenize writes this many tokens at a time: its memory, whatever the corpus
_OPEN_FILES = 8  # open files each read thread keeps on a non-local backend (file objects buffer)


# ---------------------------------------------------------------------------------------------
# Writing: tokenize


def _dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's model file (as Tokenizer.save writes it), BOS/EOS ids and BOS habit:
    equal fingerprints encode text alike."""
    with tempfile.TemporaryDirectory() as tmp:
        h = hashlib.sha256(Path(tokenizer.save(tmp)[0]).read_bytes())
    h.update(json.dumps([tokenizer.bos_id, tokenizer.eos_id, tokenizer.add_bos]).encode())
    return h.hexdigest()[:16]


def _temporary(path: epath.Path) -> epath.Path:
    return path.with_name(path.name + ".tmp")


class _ShardWriter:
    """One shard's two files, streamed under temporary names; close() renames them."""

    def __init__(self, folder: epath.Path, name: str, dtype: str, written: list):
        self.name, self.dtype = name, np.dtype(dtype).newbyteorder("<")
        self.files = [folder / f"{name}.tokens", folder / f"{name}.offsets"]
        written += self.files + [_temporary(f) for f in self.files]  # for tokenize to remove on failure
        self._tokens, self._offsets = (_temporary(f).open("wb") for f in self.files)
        self._offsets.write(np.zeros(1, "<i8").tobytes())
        self.documents = self.tokens = 0
        self._pending: list[np.ndarray] = []
        self._ends: list[int] = []
        self._pending_tokens = 0

    def add(self, ids: list[int]) -> None:
        self._pending.append(np.asarray(ids, self.dtype))
        self.tokens += len(ids)
        self.documents += 1
        self._ends.append(self.tokens)
        self._pending_tokens += len(ids)
        if self._pending_tokens >= _WRITE_TOKENS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._tokens.write(np.concatenate(self._pending).tobytes())
            self._offsets.write(np.asarray(self._ends, "<i8").tobytes())
        self._pending, self._ends, self._pending_tokens = [], [], 0

    def close(self) -> dict:
        self._flush()
        self.close_files()
        for f in self.files:
            _temporary(f).rename(f)
        return {"name": self.name, "documents": self.documents, "tokens": self.tokens}

    def close_files(self) -> None:
        self._tokens.close()
        self._offsets.close()


def tokenize(inputs: Sequence[str | os.PathLike], tokenizer, out: str | os.PathLike, *, text_key: str = "text",
             shard_tokens: int = SHARD_TOKENS, progress: bool = True) -> dict:
    """Tokenize `inputs` (.jsonl files of {text_key: ...} objects, any other file one document; see
    data.iter_documents) into a new shard set in `out` (new or empty), each document as
    `tokenizer.encode(document, eos=True)`, in the order read, into shards of about `shard_tokens`
    tokens (a document is never split between shards). Streams: memory holds one document and a
    write buffer. Returns the index (index.json's contents). On an error nothing is left but `out`."""
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out = epath.Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; tokenize writes a new shard set into a new "
                         "or empty folder")
    vocab = int(tokenizer.vocab_size)
    dtype = _dtype(vocab)
    try:  # the progress bar's total; a backend without sizes gets a bar without one
        total = sum(epath.Path(p).stat().length for p in inputs)
    except (OSError, NotImplementedError):
        total = None
    # The files are checked here, before anything is written; the bar below is fed as they are read.
    docs = iter_documents(inputs, text_key, on_bytes=lambda n: bar.update(n))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress, file=sys.stderr)
    shards: list[dict] = []
    written: list[epath.Path] = []
    writer = None
    try:
        for doc in docs:
            ids = tokenizer.encode(doc, eos=True)
            if not ids:
                continue
            if max(ids) >= vocab:  # cheap beside the encoding, and a wrong id would be a silent wrap
                raise ValueError(f"the tokenizer gave token id {max(ids)}, outside its vocabulary of {vocab}")
            if writer is None:
                out.mkdir(parents=True, exist_ok=True)
                writer = _ShardWriter(out, f"shard-{len(shards):05d}", dtype, written)
            writer.add(ids)
            if writer.tokens >= shard_tokens:
                shards.append(writer.close())
                writer = None
                bar.set_postfix(shards=len(shards))
        if writer is not None:
            shards.append(writer.close())
            writer = None
            bar.set_postfix(shards=len(shards))
        if not shards:
            raise ValueError("no documents to write: every document is blank or tokenized to nothing")
        index = {
            "format": FORMAT,
            "dtype": dtype,
            "vocab_size": vocab,
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "encoding": {"call": "tokenizer.encode(document, eos=True)", "text_key": text_key,
                         "bos_id": tokenizer.bos_id if tokenizer.add_bos else None, "eos_id": tokenizer.eos_id,
                         "order": "the inputs in the order given, each file's documents in file order"},
            "inputs": [os.fspath(p) for p in inputs],
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
        index_file = out / "index.json"
        written += [index_file, _temporary(index_file)]
        _temporary(index_file).write_text(json.dumps(index, indent=1) + "\n")
        _temporary(index_file).rename(index_file)  # last: the set is complete
        return index
    except BaseException:  # an error or Ctrl-C: take back what was written, so `out` can be used again
        if writer is not None:
            writer.close_files()
        for f in written:
            try:
                if f.exists():
                    f.unlink()
            except OSError:
                pass
        raise
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------------
# The index


def is_shards(path: str | os.PathLike) -> bool:
    """Whether `path` is a shard set: a folder holding index.json (read_index says what is wrong with one)."""
    return (epath.Path(path) / "index.json").exists()


def read_index(path: str | os.PathLike) -> dict:
    """index.json of the shard set in `path`, checked: format, dtype against the vocabulary, every shard's
    files present. One-line ValueErrors."""
    path = epath.Path(path)
    file = path / "index.json"
    if not file.exists():
        raise ValueError(f"{path}: not a token shard set (no index.json; `llama-jax tokenize` writes it last, "
                         "so an interrupted run leaves none)")
    try:
        index = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg})") from None
    fmt = index.get("format") if isinstance(index, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"{file}: format {fmt!r}, not {FORMAT!r}")
    for key in ("dtype", "vocab_size", "shards", "documents", "tokens"):
        if key not in index:
            raise ValueError(f"{file}: no {key!r} entry")
    if index["dtype"] not in ("uint16", "uint32"):
        raise ValueError(f"{file}: dtype {index['dtype']!r} is not uint16 or uint32")
    if index["vocab_size"] > np.iinfo(index["dtype"]).max + 1:
        raise ValueError(f"{file}: a vocabulary of {index['vocab_size']} tokens does not fit {index['dtype']}")
    present = {p.name for p in path.iterdir()}  # one listing, not a request per file
    for shard in index["shards"]:
        for kind in ("tokens", "offsets"):
            if f"{shard['name']}.{kind}" not in present:
                raise ValueError(f"{path}: shard file {shard['name']}.{kind} is missing")
    return index


def index_fingerprint(index: dict) -> str:
    """A hash of the index's contents: a resumed position must be on the same data."""
    return hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]


def check_vocab(index: dict, vocab_size: int) -> None:
    """A ValueError unless the shards were tokenized with a vocabulary of `vocab_size` (the model's)."""
    if int(index["vocab_size"]) != int(vocab_size):
        raise ValueError(f"the shards were tokenized with a vocabulary of {index['vocab_size']} tokens and the model's "
                         f"has {vocab_size}: tokenize the data with the model's tokenizer")


# ---------------------------------------------------------------------------------------------
# Reading: a Grain source, and this host's batches


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class ShardSource:
    """Grain random-access source over every document of a shard set: len(source) documents, source[i]
    their int32 token ids. Local shards are read with os.pread on one descriptor per file; other
    backends by range (seek and read) on a few file objects each read thread keeps open. Safe to read
    from many threads."""

    def __init__(self, path: str | os.PathLike):
        self.path = epath.Path(path)
        self.index = read_index(self.path)
        self.dtype = np.dtype(self.index["dtype"]).newbyteorder("<")
        counts = [s["documents"] for s in self.index["shards"]]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # each shard's first document
        self.local = _is_local(self.path)  # local files: os.pread; others: range reads through epath
        self._fds: dict[tuple[int, str], int] = {}  # local: (shard, kind) -> descriptor, shared by the threads
        self._lock = threading.Lock()
        self._threads = threading.local()  # non-local: each thread's open files
        weakref.finalize(self, _close_fds, self._fds)

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i) -> np.ndarray:
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} of {len(self)}")
        s = int(np.searchsorted(self._first, i, side="right")) - 1
        d = i - int(self._first[s])
        read = self._pread if self.local else self._read
        start, end = (int(x) for x in np.frombuffer(read(s, "offsets", 8 * d, 16), "<i8"))
        size = self.dtype.itemsize
        return np.frombuffer(read(s, "tokens", start * size, (end - start) * size), self.dtype).astype(np.int32)

    def __reduce__(self):  # for Grain's worker processes: reopened there, by path
        return ShardSource, (self.path,)

    def _file(self, s: int, kind: str) -> epath.Path:
        return self.path / f"{self.index['shards'][s]['name']}.{kind}"

    def _pread(self, s: int, kind: str, start: int, size: int) -> bytes:
        fd = self._fds.get((s, kind))
        if fd is None:
            with self._lock:
                if (s, kind) not in self._fds:
                    file = self._file(s, kind)
                    fd = os.open(os.fspath(file), os.O_RDONLY)
                    shard = self.index["shards"][s]
                    want = shard["tokens"] * self.dtype.itemsize if kind == "tokens" else (shard["documents"] + 1) * 8
                    if os.fstat(fd).st_size != want:
                        os.close(fd)
                        raise ValueError(f"{file}: {os.path.getsize(file)} bytes, index.json says {want}")
                    self._fds[(s, kind)] = fd
                fd = self._fds[(s, kind)]
        return self._whole(s, kind, start, size, os.pread(fd, size, start))

    def _read(self, s: int, kind: str, start: int, size: int) -> bytes:
        files = getattr(self._threads, "files", None)
        if files is None:
            files = self._threads.files = collections.OrderedDict()
        f = files.pop((s, kind), None)
        if f is None:
            f = self._file(s, kind).open("rb")
            if len(files) >= _OPEN_FILES:
                files.popitem(last=False)[1].close()
        files[(s, kind)] = f  # most recently used last
        f.seek(start)
        return self._whole(s, kind, start, size, f.read(size))

    def _whole(self, s: int, kind: str, start: int, size: int, data: bytes) -> bytes:
        if len(data) != size:
            raise ValueError(f"{self._file(s, kind)}: truncated (wanted bytes {start} to {start + size})")
        return data


def _close_fds(fds: dict) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def _as_features(doc: np.ndarray) -> dict:
    return {"tokens": doc}


def _row(packed: dict) -> dict:
    """A packed row of S + 1 tokens (ConcatThenSplit's segment ids and positions) as data.PackedText lays
    out rows: the model reads tokens[:-1] and is scored on tokens[1:] within one document."""
    segments = packed["tokens_segment_ids"]
    inputs, targets = segments[:-1], segments[1:]
    return {"tokens": packed["tokens"],
            "loss_mask": ((inputs == targets) & (inputs > 0)).astype(np.int32),
            "segment_ids": inputs.astype(np.int32),
            "positions": packed["tokens_positions"][:-1].astype(np.int32)}


def _tuples(state):
    """A Grain state back from JSON: JSON turns tuples into lists, and Grain's packer tells "no document
    split across the row edge" by comparing with a tuple, (-1, -1) != [-1, -1], so lists are tuples again."""
    if isinstance(state, dict):
        return {k: _tuples(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return tuple(_tuples(v) for v in state)
    return state


def _next_index(state) -> int | None:
    """The document index (in this host's endless shuffled sequence) in a Grain pipeline's state."""
    if isinstance(state, dict):
        if isinstance(state.get("next_index"), int):
            return state["next_index"]
        for value in state.values():
            found = _next_index(value)
            if found is not None:
                return found
    return None


def _close(box: list) -> None:
    if box:
        box.pop().close()


class ShardBatches:
    """This host's batches from a shard set, epoch after epoch: `rows` rows of seq_len + 1 tokens each
    step, as a numpy dict (tokens [rows, S+1], loss_mask, segment_ids, positions [rows, S], all int32).

    Every host builds one with the same path, seq_len and seed, and its own process_index of
    process_count; each gets `rows` rows a step from its own documents. `prefetch` batches are prepared
    ahead in a background thread (0: none), `read_threads` threads read documents. state_dict() /
    load_state_dict() save and restore the position (JSON); the rows per step may change between the two,
    nothing else may (the data, seq_len, seed and host layout are checked)."""

    def __init__(self, path: str | os.PathLike, seq_len: int, rows: int, *, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, prefetch: int = 2, read_threads: int = 8):
        if seq_len < 1 or rows < 1:
            raise ValueError(f"seq_len and rows must be >= 1, got {seq_len} and {rows}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in 0 .. {process_count - 1} (process_count "
                             f"{process_count})")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if prefetch < 0 or read_threads < 0:
            raise ValueError(f"prefetch and read_threads must be >= 0, got {prefetch} and {read_threads}")
        self.source = ShardSource(path)
        self.seq_len, self.rows = seq_len, rows
        n = len(self.source)
        if n < process_count:
            raise ValueError(f"{self.source.path}: {n} documents for {process_count} hosts; each host needs one")
        self._per_host = len(range(process_index, n, process_count))  # this host's documents an epoch
        self._key = {"data": index_fingerprint(self.source.index), "seq_len": seq_len, "seed": seed,
                     "process_index": process_index, "process_count": process_count}
        # Index arithmetic, no tables: shuffle maps index e * n + i to epoch e's i-th document (its seed
        # seed + e), the slice keeps this host's places of each epoch, repeat runs on for ever.
        docs = grain.MapDataset.source(self.source).shuffle(seed=seed)[process_index::process_count].repeat()
        read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * read_threads)
        ds = docs.map(_as_features).to_iter_dataset(read)
        ds = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len + 1})
        ds = ds.map(_row).batch(rows)
        if prefetch:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
        # The iterator sits in a list that close() (or exit) empties: closed and dropped while the
        # interpreter is whole, as Grain's own cleanup fails when it runs during teardown.
        self._box = [iter(ds)]
        self._finalizer = weakref.finalize(self, _close, self._box)

    @property
    def _it(self):
        if not self._box:
            raise ValueError("these ShardBatches are closed")
        return self._box[0]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    @property
    def epoch(self) -> int | None:
        """The epoch the next row starts in (of this host's documents; read off Grain's position, so
        exact up to the document that spans a row's edge)."""
        i = _next_index(self._it.get_state())
        return None if i is None else i // self._per_host

    def state_dict(self) -> dict:
        """The position, JSON-serialisable: the batches after load_state_dict(state) are those that
        would have followed here (prefetched batches not yet returned are not counted as read)."""
        return {"format": STATE_FORMAT, **self._key, "grain": json.loads(json.dumps(self._it.get_state()))}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("the saved data position is not one of token shards (another data pipeline saved "
                             "it); it cannot resume these")
        differ = [("another shard set (index.json differs)" if k == "data" else f"{k} {state.get(k)} (now {v})")
                  for k, v in self._key.items() if state.get(k) != v]
        if differ:
            raise ValueError(f"the saved data position is for {', '.join(differ)}: resuming would not continue "
                             "the same data order")
        self._it.set_state(_tuples(state["grain"]))

    def close(self) -> None:
        """Stop the prefetch and read threads."""
        self._finalizer()
