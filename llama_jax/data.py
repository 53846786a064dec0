"""Training data as the train step reads it: rows of tokens with loss masks, segments and positions.

    docs = read_documents(["a.txt", "b.jsonl"])                       # a .txt file is one document
    for doc in iter_documents(["gs://bucket/c.jsonl"]): ...           # streamed; any etils.epath path
    source = PackedText([tok.encode(d, eos=True) for d in docs], seq_len=2048, seed=0)
    records = read_alpaca("alpaca_data.json")                          # instruction, input, output
    source = InstructionRows(encode_alpaca(records, tok, max_len=512), seed=0, pack=False)
    batches = Batches(source, batch_size=128)
    batch = next(batches)          # numpy dict: tokens [B, S+1], loss_mask [B, S], (segment_ids, positions)
    position = batches.state_dict()                                    # goes into the checkpoint
    batches.load_state_dict(position)                                  # ... and back on resume

A source lays out one epoch's rows, in an order fixed by (seed, epoch); `Batches` walks those rows
`batch_size` at a time and runs on into the next epoch. Its position (epoch, row) is all there is to
resume: the same files, seed and position give the same batches.

Row layout (train.py): the model reads tokens[:, :-1] and is scored on tokens[:, 1:] where loss_mask is 1.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from etils import epath

from llama_jax.tokenizer import alpaca_prompt

# ---------------------------------------------------------------------------------------------
# Reading files (through etils.epath: local paths, gs:// and the other epath backends alike)


def _check_file(path: epath.Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a file")


def read_text_file(path: str | os.PathLike) -> str:
    """A UTF-8 text file's contents; one-line errors for a missing, non-text or empty file."""
    path = epath.Path(path)
    _check_file(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty file")
    return text


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file. Errors name the file and the
    line: a missing or empty file, a line that is not JSON, or JSON that is not an object."""
    path = epath.Path(path)
    records = []
    for line_no, line in enumerate(read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: line {line_no}: expected a JSON object, got {type(obj).__name__}")
        records.append((line_no, obj))
    return records


def iter_documents(paths: Sequence[str | os.PathLike], text_key: str = "text",
                   on_bytes: Callable[[int], None] | None = None) -> Iterator[str]:
    """Documents for pretraining, one at a time: a .jsonl file holds one JSON object per line, its
    document in `text_key` (read line by line, so memory holds one line, not the file); any other
    file is one document (plain text). Blank documents are skipped. `on_bytes(n)` is told each
    n bytes read (a progress bar's feed)."""
    if not paths:
        raise ValueError("no data files given")
    paths = [epath.Path(p) for p in paths]
    for path in paths:  # here, not when the first document is asked for: no hour lost to a typo in the last
        _check_file(path)
    return _documents(paths, text_key, on_bytes)


def _documents(paths: list[epath.Path], text_key: str, on_bytes: Callable[[int], None] | None) -> Iterator[str]:
    for path in paths:
        if path.suffix != ".jsonl":
            text = read_text_file(path)
            if on_bytes:
                on_bytes(len(text.encode("utf-8")))
            yield text
            continue
        read, nonblank = 0, False
        with path.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {read + e.start})") from None
                read += len(raw)
                if on_bytes:
                    on_bytes(len(raw))
                if not line.strip():
                    continue
                nonblank = True
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {line_no}: not valid JSON ({e.msg})") from None
                value = obj.get(text_key) if isinstance(obj, dict) else None
                if not isinstance(value, str):
                    raise ValueError(  # noqa: TRY004 - bad input, reported like every other
                        f"{path}: line {line_no}: field '{text_key}' is missing or not a string")
                if value.strip():
                    yield value
        if not nonblank:
            raise ValueError(f"{path}: empty file")


def read_documents(paths: Sequence[str | os.PathLike], text_key: str = "text") -> list[str]:
    """Every document of `paths` (iter_documents) in a list: for corpora that fit in memory; larger
    ones are tokenized once into shards (llama_jax.shards)."""
    return list(iter_documents(paths, text_key))


def read_alpaca(path: str | os.PathLike) -> list[dict]:
    """Alpaca records: a JSON list (or a .jsonl file) of {"instruction", "input" (optional), "output"}
    string fields. Errors name the file, the record (0-based index) and the field; in a .jsonl file, a line
    that is not a JSON object is named by its line (read_jsonl)."""
    path = epath.Path(path)
    if path.suffix == ".jsonl":
        records = [obj for _, obj in read_jsonl(path)]
    else:
        text = read_text_file(path)
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of Alpaca records, got a {type(records).__name__}")
    if not records:
        raise ValueError(f"{path}: no records")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i}: expected an object with instruction/input/output, "  # noqa: TRY004
                             f"got {type(r).__name__}")
        for field in ("instruction", "output"):
            if field not in r:
                raise ValueError(f"{path}: record {i}: field '{field}' is missing")
        for field in ("instruction", "input", "output"):
            if field in r and not isinstance(r[field], str):
                raise ValueError(f"{path}: record {i}: field '{field}' must be a string, got "
                                 f"{type(r[field]).__name__}")
        if not r["instruction"].strip():
            raise ValueError(f"{path}: record {i}: field 'instruction' is empty")
        if not r["output"].strip():
            raise ValueError(f"{path}: record {i}: field 'output' is empty")
        out.append({"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]})
    return out


# ---------------------------------------------------------------------------------------------
# Sources: one epoch's rows


def _fingerprint(arrays: Iterable[np.ndarray]) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.int64(len(a)).tobytes())
        h.update(np.ascontiguousarray(a, np.int32).tobytes())
    return h.hexdigest()[:16]


class PackedText:
    """Pretraining rows: documents (token ids, BOS/EOS included as wanted) shuffled per epoch,
    concatenated, and cut into rows of seq_len + 1 tokens, consecutive rows overlapping by one token so
    every token is a target once. Inside a row, each document (or piece of one cut by the row's edge)
    is a segment: segment ids 1, 2, ... (0 = padding), positions restart at 0, and the target that
    would cross into the next document is masked out of the loss."""

    def __init__(self, docs: Sequence[Sequence[int]], seq_len: int, seed: int = 0, pad_id: int = 0):
        self.docs = [np.asarray(d, np.int32) for d in docs if len(d)]
        if not self.docs:
            raise ValueError("no documents to train on (every document tokenized to nothing)")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.seed, self.pad_id = seq_len, seed, pad_id
        self.fingerprint = f"{_fingerprint(self.docs)}-seq{seq_len}"
        self.n_tokens = sum(len(d) for d in self.docs)

    def epoch(self, e: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, e]).permutation(len(self.docs))
        stream = np.concatenate([self.docs[i] for i in order])  # [T]
        doc_of = np.repeat(np.arange(len(order)), [len(self.docs[i]) for i in order])  # [T] document index
        s = self.seq_len
        n_rows = max(1, -(-(len(stream) - 1) // s))
        width = n_rows * s + 1
        tokens = np.full(width, self.pad_id, np.int32)
        tokens[:len(stream)] = stream
        doc = np.full(width, -1, np.int64)  # -1: padding
        doc[:len(stream)] = doc_of
        idx = np.arange(n_rows)[:, None] * s + np.arange(s + 1)[None, :]  # [rows, S+1], overlapping by one
        row_tokens, row_doc = tokens[idx], doc[idx]
        inputs_doc, targets_doc = row_doc[:, :-1], row_doc[:, 1:]  # [rows, S]
        loss_mask = (inputs_doc == targets_doc) & (inputs_doc >= 0)
        # Segments: a new one wherever the document changes along the row (and at the row's start).
        starts = np.ones_like(inputs_doc, bool)
        starts[:, 1:] = inputs_doc[:, 1:] != inputs_doc[:, :-1]
        segment_ids = np.where(inputs_doc >= 0, np.cumsum(starts, axis=1), 0).astype(np.int32)
        col = np.broadcast_to(np.arange(s), inputs_doc.shape)
        seg_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)
        positions = (col - seg_start).astype(np.int32)
        return {"tokens": row_tokens, "loss_mask": loss_mask.astype(np.int32), "segment_ids": segment_ids,
                "positions": positions}


def encode_alpaca(records: Sequence[dict], tokenizer, max_len: int = 512) -> list[tuple[np.ndarray, int]]:
    """Each record as (token ids, prompt length): the Alpaca prompt (with or without input) encoded
    with BOS as the tokenizer adds it, then the output with EOS, cut to `max_len` tokens. The prompt
    and the response are encoded apart, so the loss mask falls exactly on the response's tokens; it is
    also what generation sees (the prompt encoded alone, the model continuing it). Records whose
    prompt alone fills max_len have no response left to learn from and are dropped."""
    out = []
    for r in records:
        prompt = tokenizer.encode(alpaca_prompt(r["instruction"], r.get("input", "")))
        response = tokenizer.encode(r["output"], bos=False, eos=True)
        ids = np.asarray(prompt + response, np.int32)[:max_len]
        if len(prompt) < len(ids):
            out.append((ids, len(prompt)))
    if not out:
        raise ValueError(f"every record's prompt is at least --max-len {max_len} tokens long: no response "
                         "tokens left to train on")
    return out


class InstructionRows:
    """Instruction rows of max_len + 1 tokens (max_len = the longest example): one example per row,
    right-padded (causal attention never looks at the padding, so no segments are needed), or
    `pack`ed greedily, whole examples one after another as segments. The loss counts only targets
    inside the response (its tokens and EOS)."""

    def __init__(self, examples: Sequence[tuple[np.ndarray, int]], seed: int = 0, pack: bool = False,
                 max_len: int | None = None, pad_id: int = 0):
        if not examples:
            raise ValueError("no instruction examples")
        self.examples = [(np.asarray(ids, np.int32), int(n)) for ids, n in examples]
        self.max_len = max_len or max(len(ids) for ids, _ in self.examples)
        self.seq_len = self.max_len  # the train step's S: rows are S + 1 tokens
        self.seed, self.pack, self.pad_id = seed, pack, pad_id
        self.fingerprint = (f"{_fingerprint([np.append(ids, n) for ids, n in self.examples])}"
                            f"-len{self.max_len}-{'packed' if pack else 'padded'}")

    def epoch(self, e: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, e]).permutation(len(self.examples))
        s = self.seq_len
        rows: list[list[tuple[np.ndarray, int]]] = []
        for i in order:
            ids, n_prompt = self.examples[i]
            ids = ids[:s + 1]
            used = sum(len(x) for x, _ in rows[-1]) if rows else None
            if not self.pack or used is None or used + len(ids) > s + 1:
                rows.append([])
            rows[-1].append((ids, n_prompt))
        tokens = np.full((len(rows), s + 1), self.pad_id, np.int32)
        loss_mask = np.zeros((len(rows), s), np.int32)
        segment_ids = np.zeros((len(rows), s), np.int32)
        positions = np.broadcast_to(np.arange(s, dtype=np.int32), (len(rows), s)).copy()
        for r, row in enumerate(rows):
            o = 0
            for k, (ids, n_prompt) in enumerate(row, 1):
                n = len(ids)
                tokens[r, o:o + n] = ids
                # Input o + t predicts ids[t + 1]: counted when that token is part of the response.
                t = np.arange(n - 1)
                loss_mask[r, o + t] = (t + 1 >= n_prompt)
                segment_ids[r, o:min(o + n, s)] = k
                positions[r, o:min(o + n, s)] = np.arange(min(n, s - o))
                o += n
        out = {"tokens": tokens, "loss_mask": loss_mask}
        if self.pack:
            out.update(segment_ids=segment_ids, positions=positions)
        return out


# ---------------------------------------------------------------------------------------------
# Batches


class Batches:
    """`batch_size` rows at a time from `source`, epoch after epoch (each in its own seeded order).
    `rows`: the rows of each batch this process feeds (sharding.local_batch_rows; default all): every
    process lays out the same batches and keeps its own rows. `state_dict()` / `load_state_dict()` save
    and restore the position."""

    def __init__(self, source, batch_size: int, rows: slice = slice(None)):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.source, self.batch_size, self.rows = source, batch_size, rows
        self.epoch, self.row = 0, 0
        self._cache: tuple[int, dict] | None = None

    def _rows(self, e: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != e:
            self._cache = (e, self.source.epoch(e))
        return self._cache[1]

    def rows_in_epoch(self, e: int = 0) -> int:
        return len(self._rows(e)["tokens"])

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = []
        need = self.batch_size
        while need:
            rows = self._rows(self.epoch)
            take = min(need, len(rows["tokens"]) - self.row)
            parts.append({k: v[self.row:self.row + take] for k, v in rows.items()})
            self.row += take
            need -= take
            if self.row == len(rows["tokens"]):
                self.epoch, self.row = self.epoch + 1, 0
        return {k: np.concatenate([p[k] for p in parts])[self.rows] for k in parts[0]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row, "seed": self.source.seed,
                "fingerprint": self.source.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.source.fingerprint or state.get("seed") != self.source.seed:
            raise ValueError("the data (files, tokenizer, sequence length or seed) differ from those the checkpoint "
                             "was trained on; resuming would not continue the same data order")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])
