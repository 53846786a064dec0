"""DPO: Direct Preference Optimization (Rafailov et al., 2023). The model is tuned on pairs of responses
to one prompt, one preferred, against a frozen reference (the model it starts from); no reward model,
no sampling.

    pairs = read_pairs("pairs.jsonl")                          # {"prompt", "chosen", "rejected"} a line
    source = PairRows(encode_pairs(pairs, tok, max_len=512), seed=0)
    batches = Batches(source, batch_size=64)                   # data.Batches: pairs, resumable
    step = train.make_train_step(cfg, optimizer, objective=objective(beta=0.1))
    reference = train.base_for_training(params, cfg)           # the starting params, frozen
    state, metrics = step(state, batch, reference)             # loss, reward_margin, accuracy, ...
    step = train.make_train_step(cfg, optimizer, lora=lora, objective=objective(beta=0.1))
    state, metrics = step(state, batch, base)                  # LoRA: the reference is the base itself

The loss of a pair (x, y_c chosen, y_r rejected), averaged over pairs:

    -log sigmoid(beta * ((log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))))

log pi(y|x) being the sum of the log-probabilities of the response's tokens (EOS included) after the
prompt. beta * (log pi(y|x) - log ref(y|x)) is the response's implicit reward; the metrics report the
chosen and rejected rewards, their difference (reward_margin) and the fraction of pairs whose chosen
reward is the higher (accuracy), all averaged over the batch's pairs. The step's `tokens` metric counts
pairs here. With LoRA the reference is the base the adapters sit on, read without them, so no second
copy of the model is held; training all weights, it is a frozen compute-dtype copy of the start.

Row layout: one pair per row, as two packed segments, the prompt + chosen response (segment 1) then
the prompt + rejected response (segment 2), positions restarting at 0 in each, so that neither sees
the other. A row is then one training example to everything the train step does: micro-batches,
the batch's split over devices and the data position saved in checkpoints keep a pair together, and
one forward pass scores both responses. (The price: XLA's reference attention also computes the masked
scores between the two sides; the fused attention kernels skip those blocks.) The prompt is encoded
apart from the responses (as data.encode_alpaca does), so `chosen_mask` and `rejected_mask` fall
exactly on each response's tokens.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from llama_jax.config import LlamaConfig
from llama_jax.data import read_jsonl
from llama_jax.ops import Kernels
from llama_jax.train import scan_logits

FIELDS = ("prompt", "chosen", "rejected")
METRICS = ("reward_margin", "accuracy", "chosen_reward", "rejected_reward")  # besides the step's own

# ---------------------------------------------------------------------------------------------
# Pairs on disk, and as rows


def read_pairs(path: str | os.PathLike) -> list[dict]:
    """Preference pairs from a JSON Lines file, one {"prompt", "chosen", "rejected"} object (non-empty
    strings) a line (data.read_jsonl). Errors name the file, the line and the field."""
    path = epath.Path(path)
    pairs = []
    for line_no, obj in read_jsonl(path):
        for field in FIELDS:
            if field not in obj:
                raise ValueError(f"{path}: line {line_no}: field '{field}' is missing")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path}: line {line_no}: field '{field}' must be a string, got "  # noqa: TRY004
                                 f"{type(obj[field]).__name__}")
            if not obj[field].strip():
                raise ValueError(f"{path}: line {line_no}: field '{field}' is empty")
        pairs.append({field: obj[field] for field in FIELDS})
    return pairs


def encode_pairs(pairs: Sequence[dict], tokenizer, max_len: int = 512) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Each pair as (prompt + chosen ids, prompt + rejected ids, prompt length): the prompt as given,
    encoded with BOS as the tokenizer adds it, then each response with EOS, each side cut to `max_len`
    tokens. Pairs whose prompt alone fills max_len have no response left to compare and are dropped."""
    out = []
    for p in pairs:
        prompt = tokenizer.encode(p["prompt"])
        sides = [np.asarray(prompt + tokenizer.encode(p[k], bos=False, eos=True), np.int32)[:max_len]
                 for k in ("chosen", "rejected")]
        if len(prompt) < max_len:
            out.append((sides[0], sides[1], len(prompt)))
    if not out:
        raise ValueError(f"every pair's prompt is at least --max-len {max_len} tokens long: no response tokens "
                         "left to compare")
    return out


def _fingerprint(examples) -> str:
    # The data's identity for resuming (data.Batches.load_state_dict compares it).
    h = hashlib.sha1()
    for chosen, rejected, n_prompt in examples:
        for ids in (chosen, rejected, np.asarray([n_prompt])):
            h.update(np.int64(len(ids)).tobytes())
            h.update(np.ascontiguousarray(ids, np.int32).tobytes())
    return h.hexdigest()[:16]


class PairRows:
    """A data.Batches source of pair rows, seq_len + 1 tokens each (default: the longest pair's two
    sides together), in an order fixed by (seed, epoch). Each epoch's rows are
        tokens         int32 [pairs, S+1]  prompt + chosen, then prompt + rejected, then padding
        chosen_mask    int32 [pairs, S]    1 where the target tokens[:, t+1] is a chosen response token
        rejected_mask  int32 [pairs, S]    likewise for the rejected response
        segment_ids    int32 [pairs, S]    1 (chosen side), 2 (rejected side), 0 (padding)
        positions      int32 [pairs, S]    restarting at 0 on each side"""

    def __init__(self, examples: Sequence[tuple[np.ndarray, np.ndarray, int]], seed: int = 0,
                 seq_len: int | None = None, pad_id: int = 0):
        if not examples:
            raise ValueError("no preference pairs")
        self.examples = [(np.asarray(c, np.int32), np.asarray(r, np.int32), int(n)) for c, r, n in examples]
        longest = max(len(c) + len(r) for c, r, _ in self.examples)
        self.seq_len = seq_len or longest
        if longest > self.seq_len + 1:
            raise ValueError(f"a pair of {longest} tokens does not fit rows of {self.seq_len + 1}")
        self.seed, self.pad_id = seed, pad_id
        self.fingerprint = f"{_fingerprint(self.examples)}-seq{self.seq_len}-pairs"

    def epoch(self, e: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([self.seed, e]).permutation(len(self.examples))
        n, s = len(order), self.seq_len
        tokens = np.full((n, s + 1), self.pad_id, np.int32)
        masks = np.zeros((2, n, s), np.int32)  # chosen, rejected
        segment_ids = np.zeros((n, s), np.int32)
        positions = np.broadcast_to(np.arange(s, dtype=np.int32), (n, s)).copy()
        for row, i in enumerate(order):
            chosen, rejected, n_prompt = self.examples[i]
            o = 0  # where the side starts in the row
            for side, ids in enumerate((chosen, rejected)):
                k = len(ids)
                tokens[row, o:o + k] = ids
                # Input o + t predicts ids[t + 1]: counted when that token belongs to the response.
                t = np.arange(k - 1)
                masks[side, row, o + t] = t + 1 >= n_prompt
                segment_ids[row, o:min(o + k, s)] = side + 1
                positions[row, o:min(o + k, s)] = np.arange(min(k, s - o))
                o += k
        return {"tokens": tokens, "chosen_mask": masks[0], "rejected_mask": masks[1], "segment_ids": segment_ids,
                "positions": positions}


# ---------------------------------------------------------------------------------------------
# The objective


def response_logprobs(params, batch: dict, cfg: LlamaConfig, *, remat: str = "none", loss_chunk: int | None = None,
                      unroll: int | bool = 1, kernels: Kernels = Kernels()) -> jax.Array:
    """float32 [B, 2]: each row's log-probability of its chosen (column 0) and rejected (column 1)
    response, the sum over the response's tokens. Logits are made a chunk of the sequence at a time,
    as train.loss_sums makes them, so [B, S, V] float32 never exists for a large vocabulary."""
    inputs, targets = batch["tokens"][:, :-1], batch["tokens"][:, 1:]  # [B, S] each
    masks = jnp.stack([batch["chosen_mask"], batch["rejected_mask"]], axis=-1).astype(jnp.float32)  # [B, S, 2]

    def chunk_logprobs(total, logits, xs):
        t, m = xs  # [B, chunk], [B, chunk, 2]
        target = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
        logp = target - jax.nn.logsumexp(logits, axis=-1)  # [B, chunk]
        return total + jnp.einsum("bc,bck->bk", logp, m)

    return scan_logits(params, inputs, cfg, chunk_logprobs, jnp.zeros((inputs.shape[0], 2), jnp.float32),
                       (targets, masks), positions=batch["positions"], segment_ids=batch["segment_ids"],
                       remat=remat, loss_chunk=loss_chunk, unroll=unroll, kernels=kernels)


def preference_loss(policy: jax.Array, reference: jax.Array, beta: float):
    """From [B, 2] response log-probabilities (chosen, rejected) under the policy and the reference:
    (loss [B], chosen reward [B], rejected reward [B]), a reward being beta * log(pi(y|x) / ref(y|x))."""
    rewards = beta * (policy - reference)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return -jax.nn.log_sigmoid(chosen - rejected), chosen, rejected


def objective(beta: float = 0.1):
    """DPO as train.make_train_step's `objective`: (summed loss, pairs, summed METRICS). The reference
    is the step's `base` (the params the run started from, or with LoRA the base without adapters)."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")

    def dpo(policy, reference, batch, **model):
        if reference is None:
            raise ValueError("DPO needs the reference params: pass them as the step's `base`")
        logp = response_logprobs(policy, batch, **model)
        ref_logp = jax.lax.stop_gradient(response_logprobs(reference, batch, **model))
        loss, chosen, rejected = preference_loss(logp, ref_logp, beta)
        pair = (jnp.sum(batch["chosen_mask"], axis=-1) > 0).astype(jnp.float32)  # [B]: 0 for a padding row
        margin = chosen - rejected
        return jnp.sum(loss * pair), jnp.sum(pair), {
            "reward_margin": jnp.sum(margin * pair),
            "accuracy": jnp.sum((margin > 0) * pair),
            "chosen_reward": jnp.sum(chosen * pair),
            "rejected_reward": jnp.sum(rejected * pair),
        }

    return dpo
