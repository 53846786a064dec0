"""Evaluation: perplexity on text, and zero-shot multiple choice as in the LLaMA paper.

    import llama_jax as lj
    from llama_jax import evaluate as ev
    model = lj.load("model.gguf")
    ppl = ev.perplexity(model, open("story.txt").read(), window=1024, stride=512)
    ppl.perplexity, ppl.bits_per_byte
    task = ev.read_task("ARC-Easy-Dev.jsonl")          # or any JSONL of {context, choices, label}
    result = ev.evaluate_choice(model, task)            # result.accuracy, result.stderr
    print(ev.results_table([result], ev.paper_size(model.config)))

Everything rests on one jitted function, `token_logprobs`: the log-probability of each token given
the tokens before it. Rows are right-padded to a few bucketed lengths and a fixed batch size, so a
whole evaluation compiles a handful of programs; right padding is harmless under causal attention
(a position never sees what comes after it).

Perplexity follows Hugging Face's sliding-window definition: windows of `window` tokens start every
`stride` tokens, and each window scores only the tokens the previous one did not, so every token
but the first is scored exactly once, with up to window - 1 tokens of context.

Multiple choice follows the LLaMA paper (Touvron et al. 2023, section 3): each completion is scored
by its log-likelihood given the context, divided by its number of characters ("chars"); for BoolQ
and OpenBookQA by its likelihood given "Answer:" instead ("answer": log P(c | context) -
log P(c | "Answer:")). WinoGrande uses the partial scoring of GPT-3: the option is substituted into
the sentence (one context per choice) and the same remainder is scored after each.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.data import read_jsonl
from llama_jax.model import apply, param_count
from llama_jax.ops import Kernels

# ---------------------------------------------------------------------------------------------
# Scoring core


@functools.partial(jax.jit, static_argnames=("cfg", "kernels"))
def token_logprobs(params, tokens: jax.Array, cfg: LlamaConfig, kernels: Kernels = Kernels()) -> jax.Array:
    """float32 [batch, seq]: entry t is log p(tokens[t] | tokens[:t]); entry 0 (no context) is 0."""
    logits = apply(params, tokens, cfg, kernels=kernels)[0][:, :-1]  # float32
    picked = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
    lp = picked - jax.nn.logsumexp(logits, axis=-1)
    return jnp.pad(lp, ((0, 0), (1, 0)))


# Float32 logits of one batch are batch * length * vocab * 4 bytes; long rows of a large vocabulary
# get fewer rows per batch so that stays under this budget (e.g. 2048 x 128K vocab is 1 GiB a row).
LOGITS_BUDGET_BYTES = 2 << 30


def _bucket(n: int, max_len: int) -> int:
    # Powers of two from 16 up to the model's context: a handful of shapes, hence of compiles.
    return min(max(16, 1 << (n - 1).bit_length()), max_len)


def row_logprobs(params, cfg: LlamaConfig, rows: Sequence[Sequence[int]], batch_size: int = 8,
                 buckets: bool = True, kernels: Kernels | None = None) -> list[np.ndarray]:
    """`token_logprobs` of each row of token ids (rows of any lengths up to cfg.max_seq_len).

    Rows are grouped by bucketed length and run in batches of `batch_size`, right-padded to the bucket
    (buckets=True), or each at its own length with no padding at all (buckets=False: slower to
    compile, and a check that padding changes nothing). kernels: the kernel policy (default
    Kernels.auto(); every function below takes it and passes it here)."""
    kernels = Kernels.auto() if kernels is None else kernels
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[np.ndarray | None] = [None] * len(rows)
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        n = len(row)
        if not 1 <= n <= cfg.max_seq_len:
            raise ValueError(f"row {i} has {n} tokens; rows need 1 to {cfg.max_seq_len} (the model's context)")
        groups.setdefault(_bucket(n, cfg.max_seq_len) if buckets else n, []).append(i)
    for length in sorted(groups):
        members = groups[length]
        per = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (length * cfg.vocab_size * 4)))
        for s in range(0, len(members), per):
            chunk = members[s:s + per]
            # A fixed batch size per bucket (padding rows are zeros) keeps one shape per bucket.
            batch = np.zeros((per if buckets else len(chunk), length), np.int32)
            for j, i in enumerate(chunk):
                batch[j, :len(rows[i])] = rows[i]
            lp = np.asarray(token_logprobs(params, jnp.asarray(batch), cfg, kernels))
            for j, i in enumerate(chunk):
                out[i] = lp[j, :len(rows[i])]
    return out  # type: ignore[return-value]


def loglikelihoods(params, cfg: LlamaConfig, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   batch_size: int = 8, buckets: bool = True, kernels: Kernels | None = None) -> np.ndarray:
    """float64 [len(pairs)]: log P(continuation | context) for each (context ids, continuation ids).

    The context needs at least one token (the first continuation token is predicted from it). When a
    pair is longer than the model's context, the oldest context tokens are dropped."""
    rows, starts = [], []
    for i, (ctx, cont) in enumerate(pairs):
        ctx, cont = list(ctx), list(cont)
        if not ctx or not cont:
            raise ValueError(f"pair {i}: the context and the continuation each need at least one token")
        if len(cont) >= cfg.max_seq_len:
            raise ValueError(f"pair {i}: a continuation of {len(cont)} tokens does not fit the model's context "
                             f"of {cfg.max_seq_len} tokens")
        row = (ctx + cont)[-cfg.max_seq_len:]
        rows.append(row)
        starts.append(len(row) - len(cont))
    lps = row_logprobs(params, cfg, rows, batch_size, buckets, kernels)
    return np.array([lp[s:].astype(np.float64).sum() for lp, s in zip(lps, starts)])


# ---------------------------------------------------------------------------------------------
# Perplexity


def sliding_windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first): the window covers tokens [begin, end) and scores [first, end).

    Hugging Face's definition: windows start every `stride` tokens, and each scores the tokens after
    the previous window's end, so token i >= 1 is scored once, with between window - stride and
    window - 1 tokens of context (fewer only near the start; token 0 has no context and is never
    scored). A stride equal to the window would leave each window's first token unscored (it has
    no context inside its window), so the stride is capped at window - 1."""
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}")
    out, prev_end = [], 0
    for begin in range(0, n, min(stride, window - 1)):
        end = min(begin + window, n)
        first = max(prev_end, begin + 1)
        if first < end:
            out.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return out


@dataclasses.dataclass
class Perplexity:
    nll: float  # total negative log-likelihood, nats
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes of the text those tokens cover
    name: str = ""

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict:
        return dict(name=self.name, perplexity=self.perplexity, bits_per_byte=self.bits_per_byte,
                    nll=self.nll, tokens=self.tokens, bytes=self.bytes)


def perplexity_tokens(params, cfg: LlamaConfig, docs: Sequence[Sequence[int]], window: int | None = None,
                      stride: int | None = None, batch_size: int = 8, buckets: bool = True,
                      kernels: Kernels | None = None) -> list[tuple[float, int]]:
    """(total NLL in nats, tokens scored) of each document of token ids, by sliding windows. The
    windows of all documents are batched together. window defaults to the model's context (at most
    2048), stride to half the window."""
    window, stride = _window_and_stride(cfg, window, stride)
    rows, spans = [], []  # spans: (document, offset of the first scored token in the row)
    for d, ids in enumerate(docs):
        ids = list(ids)
        if len(ids) < 2:
            raise ValueError(f"document {d} has {len(ids)} token(s); perplexity needs at least 2")
        for begin, end, first in sliding_windows(len(ids), window, stride):
            rows.append(ids[begin:end])
            spans.append((d, first - begin))
    totals = [[0.0, 0] for _ in docs]
    for lp, (d, off) in zip(row_logprobs(params, cfg, rows, batch_size, buckets, kernels), spans):
        totals[d][0] -= float(lp[off:].astype(np.float64).sum())
        totals[d][1] += len(lp) - off
    return [(nll, n) for nll, n in totals]


def _window_and_stride(cfg: LlamaConfig, window, stride) -> tuple[int, int]:
    window = min(cfg.max_seq_len, 2048) if window is None else window
    if not 2 <= window <= cfg.max_seq_len:
        raise ValueError(f"window must be between 2 and the model's context ({cfg.max_seq_len}), got {window}")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be between 1 and the window ({window}), got {stride}")
    return window, stride


def perplexity(model, texts: str | Sequence[str], window: int | None = None, stride: int | None = None,
               batch_size: int = 8, buckets: bool = True, names: Sequence[str] | None = None,
               kernels: Kernels | None = None):
    """Perplexity and bits per byte of each text (a `Perplexity`; one text in, one out) under
    `model` (a `Loaded` with a tokenizer).

    Each text is tokenized as the model would be prompted with it (BOS when its tokenizer adds one).
    Without a BOS the first token has no context and is not scored; its bytes then leave the count,
    so bits per byte always covers exactly the scored text."""
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    tok = _tokenizer(model)
    docs, nbytes = [], []
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        name = names[i] if names else f"text {i}"
        if len(ids) < 2:
            raise ValueError(f"{name}: too short to score ({len(ids)} token(s))")
        docs.append(ids)
        unscored = 0 if ids[0] == tok.bos_id else len(tok.decode(ids[:1]).encode("utf-8"))
        nbytes.append(len(text.encode("utf-8")) - unscored)
    scores = perplexity_tokens(model.params, model.config, docs, window, stride, batch_size, buckets, kernels)
    out = [Perplexity(nll, n, b, names[i] if names else "")
           for i, ((nll, n), b) in enumerate(zip(scores, nbytes))]
    return out[0] if single else out


def _tokenizer(model):
    if getattr(model, "tokenizer", None) is None:
        raise ValueError("this model has no tokenizer (pass token ids to the *_tokens / loglikelihoods functions)")
    return model.tokenizer


# ---------------------------------------------------------------------------------------------
# Multiple choice: records and task readers


@dataclasses.dataclass
class Question:
    """One multiple-choice item: completion i is scored after contexts[i] (the same context for
    every choice, except in WinoGrande's partial scoring)."""

    contexts: list[str]
    choices: list[str]
    label: int


@dataclasses.dataclass
class Task:
    name: str  # a key of LLAMA_TABLE3 when the task is one of the paper's
    questions: list[Question]
    norm: str = "chars"  # the paper's normalisation for this task (see NORMS)
    path: str = ""


NORMS = {
    "chars": "log-likelihood / characters of the completion (the paper's default)",
    "answer": 'log P(completion | context) - log P(completion | "Answer:") (BoolQ, OpenBookQA)',
    "tokens": "log-likelihood / tokens of the completion",
    "none": "log-likelihood",
}

FORMATS = ("jsonl", "boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-e", "arc-c", "obqa")


def _field(rec: dict, key: str, kind, where: str):
    if key not in rec:
        raise ValueError(f"{where}: missing field '{key}'")
    value = rec[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ValueError(f"{where}: field '{key}' must be {names}, got {json.dumps(value)[:60]}")
    return value


def _str_list(rec, key, where, min_len=2) -> list[str]:
    value = _field(rec, key, list, where)
    if len(value) < min_len or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where}: field '{key}' must be a list of at least {min_len} strings")
    return value


def _label(label: int, n_choices: int, where: str, key: str = "label") -> int:
    if not 0 <= label < n_choices:
        raise ValueError(f"{where}: field '{key}' = {label} is out of range for {n_choices} choices "
                         f"(labels count from 0)")
    return label


def _generic(rec, where) -> Question:
    choices = _str_list(rec, "choices", where)
    context = _field(rec, "context", (str, list), where)
    if isinstance(context, str):
        contexts = [context] * len(choices)
    elif len(context) == len(choices) and all(isinstance(c, str) for c in context):
        contexts = list(context)  # one context per choice (partial scoring)
    else:
        raise ValueError(f"{where}: field 'context' must be a string, or a list of strings, one per choice")
    return Question(contexts, choices, _label(_field(rec, "label", int, where), len(choices), where))


def _boolq(rec, where) -> Question:
    passage = _field(rec, "passage", str, where)
    question = _field(rec, "question", str, where)
    answer = _field(rec, "answer", bool, where)
    context = f"{passage}\nQuestion: {question}?\nAnswer:"
    return Question([context] * 2, [" no", " yes"], int(answer))


def _qa(stem: str, answers: list[str], label: int) -> Question:
    context = f"Question: {stem}\nAnswer:"
    return Question([context] * len(answers), [" " + a for a in answers], label)


def _piqa(rec, where) -> Question:
    goal = _field(rec, "goal", str, where)
    sols = [_field(rec, k, str, where) for k in ("sol1", "sol2")]
    return _qa(goal, sols, _label(_int_label(_field(rec, "label", (int, str), where), where, "label"), 2, where))


def _siqa(rec, where) -> Question:
    stem = f"{_field(rec, 'context', str, where)} {_field(rec, 'question', str, where)}"
    answers = [_field(rec, k, str, where) for k in ("answerA", "answerB", "answerC")]
    label = _int_label(_field(rec, "label", (int, str), where), where, "label") - 1  # SIQA counts from 1
    return _qa(stem, answers, _label(label, 3, where, "label (counting from 1)"))


def _hellaswag_text(text: str) -> str:
    # WikiHow contexts carry markup such as "[title]" and "[step]": a title ends a sentence, the rest goes.
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return re.sub(" +", " ", text).strip()


def _hellaswag(rec, where) -> Question:
    activity = _field(rec, "activity_label", str, where)
    if "ctx_a" in rec:
        ctx_b = _field(rec, "ctx_b", str, where) if "ctx_b" in rec else ""
        # ctx_b continues ctx_a's sentence in lower case ("he is ..."); upper-case its first letter only.
        ctx = f"{_field(rec, 'ctx_a', str, where)} {ctx_b[:1].upper()}{ctx_b[1:]}"
    else:
        ctx = _field(rec, "ctx", str, where)
    endings = _str_list(rec, "endings", where)
    context = _hellaswag_text(f"{activity}: {ctx}")
    label = _field(rec, "label", (int, str), where)
    label = _int_label(label, where, "label")
    return Question([context] * len(endings), [" " + _hellaswag_text(e) for e in endings],
                    _label(label, len(endings), where))


def _winogrande(rec, where) -> Question:
    sentence = _field(rec, "sentence", str, where)
    options = [_field(rec, k, str, where) for k in ("option1", "option2")]
    if sentence.count("_") != 1:
        raise ValueError(f"{where}: field 'sentence' must hold exactly one '_' blank")
    before, after = sentence.split("_")
    answer = _field(rec, "answer", str, where)
    if answer not in ("1", "2"):
        raise ValueError(f"{where}: field 'answer' must be \"1\" or \"2\", got {json.dumps(answer)} "
                         "(the test split ships without answers)")
    # Partial scoring: the option goes into the context, the rest of the sentence is the completion.
    rest = " " + after.strip()
    return Question([before + o for o in options], [rest, rest], int(answer) - 1)


def _arc(rec, where) -> Question:
    q = _field(rec, "question", dict, where)
    stem = _field(q, "stem", str, where + " question")
    choices = _field(q, "choices", list, where + " question")
    if len(choices) < 2 or not all(isinstance(c, dict) and isinstance(c.get("text"), str) for c in choices):
        raise ValueError(f"{where}: field 'question.choices' must be a list of at least 2 {{text, label}} objects")
    keys = [str(c.get("label")) for c in choices]
    key = str(_field(rec, "answerKey", str, where))
    if key not in keys:
        raise ValueError(f"{where}: field 'answerKey' = {key!r} is not one of the choice labels {keys}")
    return _qa(stem, [c["text"] for c in choices], keys.index(key))


def _obqa(rec, where) -> Question:
    q = _arc(rec, where)
    # The paper's OpenBookQA prompt is the bare question stem (scored against "Answer:" anyway).
    stem = rec["question"]["stem"]
    return Question([stem] * len(q.choices), q.choices, q.label)


def _int_label(value, where, key):
    if isinstance(value, str):
        if not value.strip().lstrip("-").isdigit():
            raise ValueError(f"{where}: field '{key}' must be an integer, got {json.dumps(value)}")
        return int(value)
    return value


def _attach_labels(path: Path, records: list[tuple[int, dict]]) -> None:
    """PIQA and SIQA ship their labels beside the data as NAME-labels.lst, one per line; copy them
    into the records that lack a 'label' field (the Hugging Face copies carry one)."""
    if all("label" in rec for _, rec in records):
        return
    lst = path.with_name(path.stem + "-labels.lst")
    if not lst.is_file():
        n = next(n for n, rec in records if "label" not in rec)
        raise ValueError(f"{path}: line {n}: no field 'label' and no labels file {lst.name} beside the data")
    lines = lst.read_text().split()
    if len(lines) != len(records):
        raise ValueError(f"{lst}: {len(lines)} labels for {len(records)} records")
    for (_, rec), label in zip(records, lines):
        rec.setdefault("label", label)


def detect_format(path: Path, rec: dict) -> str:
    """The format of a task file, from its first record's fields (and, for ARC vs OpenBookQA, which
    share a format, the file name)."""
    name = str(path).lower()
    if "choices" in rec and "context" in rec:
        return "jsonl"
    if {"passage", "question", "answer"} <= rec.keys():
        return "boolq"
    if "goal" in rec and "sol1" in rec:
        return "piqa"
    if "answerA" in rec:
        return "siqa"
    if "endings" in rec:
        return "hellaswag"
    if "option1" in rec and "sentence" in rec:
        return "winogrande"
    if isinstance(rec.get("question"), dict) and "answerKey" in rec:
        if "openbook" in name or "obqa" in name or "fact1" in rec:
            return "obqa"
        if "challenge" in name:
            return "arc-c"
        if "easy" in name:
            return "arc-e"
        raise ValueError(f"{path}: ARC or OpenBookQA records; say which with --format arc-e, arc-c or obqa")
    raise ValueError(f"{path}: unknown record format (fields {sorted(rec)}); expected {{context, choices, label}} "
                     f"or one of {', '.join(FORMATS[1:])}")


def read_task(path: str | Path, format: str = "auto", limit: int | None = None) -> Task:
    """A task from a JSONL file: our {context, choices, label} records (context may be a list, one
    per choice), or the released files of BoolQ, PIQA (+ labels .lst), SIQA (+ labels .lst),
    HellaSwag, WinoGrande, ARC or OpenBookQA. Malformed records are errors naming file, line, field."""
    path = Path(path)
    records = read_jsonl(path)
    if format == "auto":
        format = detect_format(path, records[0][1])
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; one of auto, {', '.join(FORMATS)}")
    if format in ("piqa", "siqa"):
        _attach_labels(path, records)
    readers = {
        "jsonl": _generic, "boolq": _boolq, "piqa": _piqa, "siqa": _siqa, "hellaswag": _hellaswag,
        "winogrande": _winogrande, "arc-e": _arc, "arc-c": _arc, "obqa": _obqa,
    }
    read = readers[format]
    questions = [read(rec, f"{path}: line {n}") for n, rec in records[:limit]]
    name = path.stem if format == "jsonl" else format
    return Task(name, questions, "answer" if format in ("boolq", "obqa") else "chars", str(path))


# ---------------------------------------------------------------------------------------------
# Multiple choice: scoring


def completion_tokens(tokenizer, context: str, completion: str) -> tuple[list[int], list[int]]:
    """(context ids, completion ids) of context + completion, tokenized together and split where
    the context's own tokens end (tokenizers merge across a boundary and drop or add leading
    spaces: tokenizing the completion alone would score different tokens). Where the joined text
    merges a token across the boundary, that token goes to the completion."""
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + completion)
    k = 0
    while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
        k += 1
    if k == len(whole):
        raise ValueError(f"the completion {completion!r} adds no tokens to its context")
    if k == 0:
        # Nothing to condition the first token on: start from BOS (or EOS, the usual document separator).
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if start is None:
            raise ValueError("an empty context needs a BOS or EOS token to start from; this tokenizer has neither")
        return [start], whole
    return whole[:k], whole[k:]


@dataclasses.dataclass
class ChoiceResult:
    task: str
    norm: str
    n: int
    accuracy: float  # under `norm`
    stderr: float  # standard error of the accuracy: sqrt(acc (1 - acc) / (n - 1))
    predictions: list[int]
    labels: list[int]
    loglikelihoods: list[list[float]]  # log P(completion | context) per question and choice
    accuracies: dict  # accuracy under every normalisation computed (the unnormalised one included)

    def to_dict(self) -> dict:
        stderr = None if math.isnan(self.stderr) else self.stderr  # JSON has no NaN
        return dict(task=self.task, norm=self.norm, n=self.n, accuracy=self.accuracy, stderr=stderr,
                    accuracies=self.accuracies)


def _stderr(correct: np.ndarray) -> float:
    n = len(correct)
    if n < 2:
        return float("nan")
    p = correct.mean()
    return float(math.sqrt(p * (1 - p) / (n - 1)))


def evaluate_choice(model, task: Task | Sequence[Question], norm: str | None = None, batch_size: int = 8,
                    buckets: bool = True, kernels: Kernels | None = None) -> ChoiceResult:
    """Zero-shot accuracy of `model` (a `Loaded` with a tokenizer) on a task. `norm` (see NORMS)
    defaults to the task's own (the paper's choice for it)."""
    if not isinstance(task, Task):
        task = Task("task", list(task))
    norm = norm or task.norm
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; one of {', '.join(NORMS)}")
    if not task.questions:
        raise ValueError(f"{task.name}: no questions")
    tok = _tokenizer(model)
    # Requests are deduplicated: BoolQ's " yes" / " no" after "Answer:" are scored once, not per question.
    requests: dict[tuple[str, str], int] = {}

    def request(ctx, completion):
        return requests.setdefault((ctx, completion), len(requests))

    cond = [[request(c, x) for c, x in zip(q.contexts, q.choices)] for q in task.questions]
    uncond = [[request("Answer:", x) for x in q.choices] for q in task.questions] if norm == "answer" else None
    pairs = [completion_tokens(tok, c, x) for c, x in requests]
    ll = loglikelihoods(model.params, model.config, pairs, batch_size, buckets, kernels)
    n_tokens = np.array([len(p[1]) for p in pairs])

    scores: dict[str, list[np.ndarray]] = {k: [] for k in ("none", "chars", "tokens")}
    if uncond is not None:
        scores["answer"] = []
    for i, q in enumerate(task.questions):
        lls = ll[cond[i]]
        scores["none"].append(lls)
        scores["chars"].append(lls / np.array([max(1, len(x)) for x in q.choices]))
        scores["tokens"].append(lls / n_tokens[cond[i]])
        if uncond is not None:
            scores["answer"].append(lls - ll[uncond[i]])
    labels = np.array([q.label for q in task.questions])
    accuracies, correct = {}, {}
    for k, s in scores.items():
        pred = np.array([int(np.argmax(x)) for x in s])
        correct[k] = (pred == labels).astype(np.float64)
        accuracies[k] = float(correct[k].mean())
    predictions = [int(np.argmax(x)) for x in scores[norm]]
    return ChoiceResult(task.name, norm, len(labels), accuracies[norm], _stderr(correct[norm]), predictions,
                        labels.tolist(), [ll[c].tolist() for c in cond], accuracies)


# ---------------------------------------------------------------------------------------------
# The LLaMA paper's numbers (Touvron et al. 2023, Table 3: zero-shot common sense reasoning, accuracy %)

LLAMA_TABLE3 = {
    "boolq": {"7B": 76.5, "13B": 78.1, "33B": 83.1, "65B": 85.3},
    "piqa": {"7B": 79.8, "13B": 80.1, "33B": 82.3, "65B": 82.8},
    "siqa": {"7B": 48.9, "13B": 50.4, "33B": 50.4, "65B": 52.3},
    "hellaswag": {"7B": 76.1, "13B": 79.2, "33B": 82.8, "65B": 84.2},
    "winogrande": {"7B": 70.1, "13B": 73.0, "33B": 76.0, "65B": 77.0},
    "arc-e": {"7B": 72.8, "13B": 74.8, "33B": 80.0, "65B": 78.9},
    "arc-c": {"7B": 47.6, "13B": 52.7, "33B": 57.8, "65B": 56.0},
    "obqa": {"7B": 57.2, "13B": 56.4, "33B": 58.6, "65B": 60.2},
}
PAPER_SIZES = {"7B": 6.7e9, "13B": 13.0e9, "33B": 32.5e9, "65B": 65.2e9}


def paper_size(cfg: LlamaConfig) -> str:
    """The paper's model size nearest, in log parameter count, to `cfg`'s (counted from the config,
    not the params, which may be quantized and packed)."""
    n = param_count(cfg)
    return min(PAPER_SIZES, key=lambda s: abs(math.log(PAPER_SIZES[s] / n)))


def results_table(results: Sequence[ChoiceResult], size: str = "7B") -> str:
    """A text table: each task's accuracy (%, with its standard error) beside LLaMA-`size`'s."""
    if size not in PAPER_SIZES:
        raise ValueError(f"unknown paper size {size!r}; one of {', '.join(PAPER_SIZES)}")
    lines = [f"{'task':<14} {'n':>6}  {'norm':<6} {'accuracy':>14}  {'LLaMA ' + size + ' (paper)':>16}"]
    for r in results:
        paper = LLAMA_TABLE3.get(r.task, {}).get(size)
        acc = f"{100 * r.accuracy:.1f} ± {100 * r.stderr:.1f}" if not math.isnan(r.stderr) else f"{100 * r.accuracy:.1f}"
        lines.append(f"{r.task:<14} {r.n:>6}  {r.norm:<6} {acc:>14}  {'-' if paper is None else f'{paper:.1f}':>16}")
    return "\n".join(lines)
