"""Continuous batching over a paged KV cache: the engine behind `llama-jax serve`.

    engine = Engine(model.params, model.config, eos_id=model.tokenizer.eos_id, max_batch=256, kv_blocks=4096)
    engine.start()                                     # the device loop, in a thread of its own
    rid = engine.submit(prompt_ids, Request(max_tokens=64, temperature=0.8, seed=1), on_tokens)
    engine.cancel(rid)                                 # its blocks are freed at the next step
    engine.stop(deadline=30)                           # refuse new work, finish (or cancel) the rest

`on_tokens(tokens, finish)` is called from the engine's thread with each request's new token ids, and once
with `finish` set: "stop" (EOS), "length" (max_tokens), "cancelled" or "error". Without `start`, a caller
drives the engine itself: `submit`, then `step()` until `idle` (tests, benchmarks).

Each step (docs/serving.md draws it):
1. Requests from other threads join the waiting queue; cancelled ones leave and free their blocks.
2. Waiting requests are admitted, oldest first, while a row is free (`max_batch`) and the free blocks cover
   their context with some to spare.
3. Decode: every running sequence whose context is all in the cache but its last token feeds that token.
   A sequence that crosses into a new block takes one from the free list; when none is left, the youngest
   running sequence is preempted: its blocks are freed and it goes back to the head of the queue, to be
   prefilled again from its prompt and the tokens it has produced (its output does not change).
4. Prefill: sequences whose context is not yet in the cache feed chunks of it, up to `prefill_tokens` a
   step in all, so a long prompt takes several steps and never stalls the decodes beside it.
5. Both run (each one jitted call: the model over the paged cache, then sampling). The host does not wait
   for them: it takes the tokens of the step before (already done on the device), hands them out, and
   finished sequences free their blocks; then it plans the next step while this one runs.

The host plans step i+1 before it has seen step i's tokens: a sequence that step i gives a token decodes it
at step i+1 without the host, from a device array of every running sequence's last sampled token (one slot
each). `max_tokens` is known in advance, so only a sequence that ends on EOS costs one wasted row (its
token in the step already dispatched is dropped). Blocks and slots freed while a step is in flight are
safe to hand out again: the device runs the steps in order, so a new owner's writes land after the old
owner's, and attention reads no slot beyond a row's own length.

The paged cache (model.PagedKVCache) holds every layer's keys and values (in `cache_dtype`, default the
compute dtype) in `kv_blocks` blocks of `block_size` tokens; a sequence's block table lists its blocks in
order, so memory follows the tokens in flight, not max_batch times the context. Block ops.NO_BLOCK is never handed out: padding writes there.

Shapes are bucketed so that the jitted calls compile once per bucket, not per request mix: decode rows to
powers of two from 8; a prefill step to [rows, chunk], its chunk length a power of two from 16 and its
rows a power of two up to prefill_tokens // chunk; block tables to powers of two from 8 blocks, except a
decode step's where the kernel reads blocks in place (ops.decode_reads_in_place): those are as wide as the
longest context, one width for every step, so no decode step recompiles as sequences grow. Sampling
parameters are arrays, so a batch mixes them freely; a batch of greedy rows only compiles without the
sampler.

Each request is computed as if alone: its tokens sit at their own positions, attention reads only its own
blocks, and token t is drawn from fold_in(key(seed), t) with a [1, vocab] draw, as `generate` draws it for
one prompt. Greedy output equals `generate`'s for the same prompt (bar float rounding of the batched
matmuls), and so does a seeded sample.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import sys
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llama_jax.config import LlamaConfig
from llama_jax.generate import Sampling, check_cache_dtype
from llama_jax.model import PagedKVCache, apply
from llama_jax.ops import NO_BLOCK, Kernels, decode_reads_in_place

OnTokens = Callable[[list[int], "str | None"], None]  # new token ids, and the finish reason once finished
# Blocks: a decode step's tables up to this wide go whole to every step where the kernel reads blocks in
# place (1 MiB at 256 rows; 16k tokens of context in blocks of 16); longer contexts bucket beyond it.
FIXED_DECODE_WIDTH = 1024
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds max_queue requests already (the server answers 429)."""


class Closed(Exception):
    """The engine is stopping and takes no new requests (the server answers 503)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """How one request generates. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        Sampling(self.temperature, self.top_k, self.top_p)  # its checks and messages
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**31:
            raise ValueError(f"seed must be an integer in [0, 2**31), got {self.seed!r}")


@dataclasses.dataclass(eq=False)
class _Seq:
    id: int
    tokens: list[int]  # the prompt, then every token produced
    prompt_len: int
    request: Request
    on_tokens: OnTokens
    blocks: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # tokens whose keys and values are in the cache or written by a dispatched step
    pending: int = 0  # tokens sampled by a dispatched step that the host has not seen yet (0 or 1)
    slot: int = -1  # its entry in the device array of last sampled tokens, while running
    admitted: int = 0  # admission order: the youngest is preempted first
    finished: bool = False

    @property
    def produced(self) -> int:
        """Tokens handed out so far."""
        return len(self.tokens) - self.prompt_len

    @property
    def length(self) -> int:
        """The context: the prompt, the tokens produced and the one in flight."""
        return len(self.tokens) + self.pending


def _pow2(n: int, low: int) -> int:
    return max(low, 1 << (n - 1).bit_length())


def default_kv_blocks(cfg: LlamaConfig, block_size: int, max_batch: int, device: jax.Device | None = None,
                      cache_dtype: str | None = None) -> int:
    """Blocks for `max_batch` sequences of the whole context, or as many as 85% of the device's free memory
    holds (read after the params are placed), whichever is fewer; 1 GiB of them where the device does not
    say (the CPU). cache_dtype: the pool's (default the compute dtype)."""
    itemsize = jnp.dtype(cache_dtype or cfg.compute_jnp_dtype).itemsize
    per_block = 2 * cfg.n_layers * block_size * cfg.n_kv_heads * cfg.head_dim * itemsize
    want = max_batch * -(-cfg.max_seq_len // block_size) + 1
    stats = (device or jax.local_devices()[0]).memory_stats() or {}
    if "bytes_limit" in stats:
        room = int(0.85 * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    else:
        room = 1 << 30
    return max(2, min(want, room // per_block))


# ---------------------------------------------------------------------------------------------
# The device work: one jitted call per step and kind (prefill chunks, decode)


def sample_rows(logits, seeds, steps, temperature, top_k, top_p):
    """logits float32 [batch, vocab] -> int32 [batch]: row i drawn as `generate.sample` draws one prompt's
    token `steps[i]` with Sampling(temperature[i], top_k[i], top_p[i]) and key fold_in(key(seeds[i]), step):
    temperature, then top-k, then top-p, then a [1, vocab] categorical draw. Parameters are arrays, so one
    compiled sampler serves any mix."""
    vocab = logits.shape[-1]

    def one(row, seed, step, t, k, p):
        x = row / jnp.where(t > 0, t, 1.0)
        kth = jnp.sort(x)[::-1][jnp.clip(k - 1, 0, vocab - 1)]
        x = jnp.where((k > 0) & (x < kth), -jnp.inf, x)
        ranked = jnp.sort(x)[::-1]
        probs = jax.nn.softmax(ranked)
        keep = jnp.cumsum(probs) - probs < p  # as generate.filter_logits: the mass above each token
        cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf))
        x = jnp.where((p < 1) & (x < cutoff), -jnp.inf, x)
        key = jax.random.fold_in(jax.random.key(seed), step)
        drawn = jax.random.categorical(key, x[None], axis=-1)[0]
        return jnp.where(t > 0, drawn, jnp.argmax(row)).astype(jnp.int32)

    return jax.vmap(one)(logits, seeds, steps, temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("cfg", "kernels", "unroll", "greedy"),
                   donate_argnames=("k", "v", "slot_tokens"))
def forward_and_sample(params, k, v, slot_tokens, tables, tokens, from_slot, slots, positions, token_mask, last,
                       seeds, steps, temperature, top_k, top_p, *, cfg, kernels, unroll, greedy):
    """The model over [rows, seq] tokens at their positions through the paged cache, then each row's next
    token from the logits of its token `last`. A row with from_slot set feeds slot_tokens[slots[row]] as its
    first token (the token the step before sampled for it, which the host has not seen); every row's sampled
    token goes to its slot. Returns the tokens [rows], the updated pools and the slot tokens."""
    tokens = tokens.at[:, 0].set(jnp.where(from_slot, slot_tokens[slots], tokens[:, 0]))
    cache = PagedKVCache(k, v, tables)
    logits, cache = apply(params, tokens, cfg, positions=positions, cache=cache, token_mask=token_mask,
                          logits_at=last, kernels=kernels, unroll=unroll)
    logits = logits[:, 0]
    if greedy:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        token = sample_rows(logits, seeds, steps, temperature, top_k, top_p)
    return token, cache.k, cache.v, slot_tokens.at[slots].set(token)


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """Continuous batching of requests over one paged KV cache (see the module's docstring)."""

    def __init__(self, params, cfg: LlamaConfig, *, eos_id: int | None = None, max_batch: int = 256,
                 kv_blocks: int | None = None, block_size: int = 16, max_queue: int = 1024,
                 prefill_tokens: int = 512, kernels: Kernels | None = None, cache_dtype: str | None = None):
        for name, value in (("max_batch", max_batch), ("block_size", block_size), ("max_queue", max_queue)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if prefill_tokens < 16 or prefill_tokens & (prefill_tokens - 1):
            raise ValueError(f"prefill_tokens must be a power of two >= 16, got {prefill_tokens}")
        self.params, self.cfg = params, cfg
        self.kernels = Kernels.auto() if kernels is None else kernels
        self.eos_id = cfg.eos_id if eos_id is None else eos_id
        self.max_batch, self.block_size, self.max_queue = max_batch, block_size, max_queue
        self.prefill_tokens = prefill_tokens
        # The pool's dtype, default the compute dtype; float8_e4m3fn holds twice a bf16 pool's tokens,
        # and a decode step's attention reads half the bytes (keys and values rounded to 8 bits as written).
        self.cache_dtype = check_cache_dtype(cache_dtype) or jnp.dtype(cfg.compute_jnp_dtype).name
        self.kv_blocks = kv_blocks or default_kv_blocks(cfg, block_size, max_batch, cache_dtype=self.cache_dtype)
        if self.kv_blocks < 2:
            raise ValueError(f"kv_blocks must be >= 2 (block {NO_BLOCK} takes padding), got {self.kv_blocks}")
        self._reset_device_state()  # self._pool, and self._slot_tokens: each running sequence's last sampled token
        self._free = [b for b in range(self.kv_blocks - 1, -1, -1) if b != NO_BLOCK]  # pop() takes low ids first
        self._free_slots = list(range(max_batch - 1, -1, -1))
        self._in_flight: list[tuple[list[tuple[_Seq, bool]], jax.Array]] = []  # the last step's calls: rows, tokens
        self._spare = max(1, self.kv_blocks // 100)  # blocks admission leaves for the running decodes
        # Where the kernel reads each row's blocks in place, every decode step passes block tables as wide as
        # the longest sequence's (up to FIXED_DECODE_WIDTH): one program a row bucket, and no recompile (a
        # stall of every stream) when a sequence grows past a width. The XLA reference gathers the whole
        # width, so there it is bucketed.
        longest = min(self._blocks_for(cfg.max_seq_len), self.kv_blocks - 1)
        in_place = decode_reads_in_place(self.kernels, self._pool.k, cfg.n_heads, cfg.compute_jnp_dtype)
        self._decode_width = min(_pow2(longest, 8), FIXED_DECODE_WIDTH) if in_place else 0
        self.shapes_dispatched: set[tuple[int, int, int]] = set()  # (rows, tokens a row, table width): a program each
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: dict[_Seq, None] = {}  # in admission order; a dict for O(1) membership and removal
        self._by_id: dict[int, _Seq] = {}
        self._ids = itertools.count()
        self._admissions = itertools.count()
        # Other threads hand work over through these, under the condition's lock.
        self._cond = threading.Condition()
        self._inbox: collections.deque[_Seq] = collections.deque()
        self._cancels: set[int] = set()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.tokens_out = 0  # tokens produced since the start
        self.steps_dispatched = 0
        self.warming = False  # compiling the decode steps ahead (start(warm_up=True))
        # Where the engine thread's time goes: waiting for the device's tokens, and the rest of step() (planning,
        # building the arrays, dispatching, the callbacks). The device idles only while the host works on a
        # step whose predecessor is done, so a wait near zero says the host is the bottleneck.
        self.wait_seconds = self.step_seconds = 0.0
        self.preemptions = 0
        self.last_error: Exception | None = None
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of recent steps

    # --- what other threads call ---

    def submit(self, prompt: Sequence[int], request: Request, on_tokens: OnTokens) -> int:
        """Queue a prompt (token ids); returns the request's id. Raises ValueError for a request that can never
        run (its tokens outside the vocabulary, longer than the context or than the whole cache), QueueFull,
        or Closed."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt has no tokens (start from BOS at least)")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"the prompt has token ids outside [0, {self.cfg.vocab_size})")
        total = len(prompt) + request.max_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; with max_tokens={request.max_tokens} that is "
                             f"{total}, more than the model's context of {self.cfg.max_seq_len} tokens")
        if -(-total // self.block_size) > self.kv_blocks - 1:
            raise ValueError(f"the prompt and max_tokens need {total} tokens of KV cache; it holds "
                             f"{(self.kv_blocks - 1) * self.block_size}")
        with self._cond:
            if self._closed:
                raise Closed("the server is shutting down")
            if len(self._inbox) + len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); try again later")
            seq = _Seq(next(self._ids), prompt, len(prompt), request, on_tokens)
            self._inbox.append(seq)
            self._cond.notify()
        return seq.id

    def cancel(self, request_id: int) -> None:
        """Drop a request (a client that went away); its blocks are freed at the next step. Unknown or
        finished ids are ignored."""
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    def start(self, warm_up: bool = False, progress: bool = False) -> None:
        """Run the steps in a thread of the engine's own until `stop`; with `warm_up`, the thread first runs
        `warm_up(progress)` (`warming` is True until it is done; requests wait in the queue meanwhile)."""
        self.warming = warm_up
        self._thread = threading.Thread(target=self._loop, args=(warm_up, progress), name="llama-jax-engine",
                                        daemon=True)
        self._thread.start()

    def stop(self, deadline: float = 30.0) -> None:
        """Refuse new requests (Closed), let those in flight finish for up to `deadline` seconds, cancel the
        rest, and end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        end = time.monotonic() + deadline
        while not self.idle and time.monotonic() < end and self._thread is not None and self._thread.is_alive():
            time.sleep(0.02)
        with self._cond:
            self._cancels.update(s.id for s in list(self._inbox) + list(self._waiting) + list(self._running))
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        else:
            while not self.idle:  # a driven engine: the cancellations, and the step in flight
                self.step()

    @property
    def idle(self) -> bool:
        return not (self._inbox or self._waiting or self._running or self._cancels or self._in_flight)

    def stats(self) -> dict:
        """What /metrics shows: queue length, running sequences, KV blocks in use of the total, tokens
        produced, and tokens a second over the last ten seconds."""
        now = time.monotonic()
        with self._cond:
            recent = [(t, n) for t, n in self._recent if t > now - 10]
        rate = sum(n for _, n in recent) / (now - recent[0][0]) if len(recent) > 1 else 0.0
        return {"waiting": len(self._inbox) + len(self._waiting), "running": len(self._running),
                "kv_blocks_used": self.kv_blocks - 1 - len(self._free), "kv_blocks_total": self.kv_blocks - 1,
                "tokens_out": self.tokens_out, "tokens_per_s": rate, "preemptions": self.preemptions}

    # --- the steps ---

    def _loop(self, warm_up: bool, progress: bool):
        if warm_up:
            try:
                self.warm_up(progress)
            except Exception:  # noqa: BLE001 - serving goes on; the steps compile on first use instead
                log.exception("llama-jax engine: the warm-up failed; steps compile when first needed")
            finally:
                self.warming = False
        while True:
            with self._cond:
                while self.idle and not self._closed:
                    self._cond.wait()
                if self._closed and self.idle:
                    return
            try:
                self.step()
            except Exception as e:  # a failed device call: every request in flight ends with "error"
                log.exception("llama-jax engine: a step failed; the requests in flight end with an error")
                self._fail_all(e)

    def step(self) -> int:
        """One iteration: take new requests and cancellations, admit, dispatch a decode and a prefill chunk,
        then hand out the tokens of the step dispatched before this one. Returns how many tokens it handed
        out."""
        start = time.perf_counter()
        self._take_inbox()
        self._admit()
        decode = self._plan_decode()
        prefill = self._plan_prefill()
        if not decode and not prefill and not self._in_flight and self._running:
            self._preempt(max(self._running, key=lambda s: s.admitted))  # no block for anyone: the youngest
        calls = [self._dispatch(rows) for rows in (prefill, decode) if rows]
        self.steps_dispatched += bool(calls)
        previous, self._in_flight = self._in_flight, calls
        produced = 0
        for rows, future in previous:
            waited = time.perf_counter()
            tokens = np.asarray(future)  # done on the device by now, or nearly: this step's calls queue behind it
            self.wait_seconds += time.perf_counter() - waited
            for (seq, produces), token in zip(rows, tokens):
                if produces:
                    seq.pending -= 1
                    if not seq.finished:
                        produced += self._take_token(seq, int(token))
        if produced:
            now = time.monotonic()
            with self._cond:
                self.tokens_out += produced
                self._recent.append((now, produced))
                while self._recent[0][0] < now - 10:
                    self._recent.popleft()
        self.step_seconds += time.perf_counter() - start
        return produced

    def _take_inbox(self):
        with self._cond:
            new, self._inbox = list(self._inbox), collections.deque()
            cancels, self._cancels = self._cancels, set()
        for seq in new:
            self._by_id[seq.id] = seq
            self._waiting.append(seq)
        for rid in cancels:
            seq = self._by_id.get(rid)
            if seq is not None:
                self._finish(seq, "cancelled")

    def _admit(self):
        promised = sum(self._blocks_for(s.length + 1) - len(s.blocks) for s in self._running
                       if s.cached < s.length - 1)  # what the running prefills will still take
        while self._waiting and len(self._running) < self.max_batch:
            if self._waiting[0].pending:
                break  # preempted with a token in flight: its context is known once the token is
            need = self._blocks_for(self._waiting[0].length + 1)
            if len(self._free) - promised - need < self._spare and self._running:
                break  # the queue waits for blocks (an empty batch takes its head anyway: it fits alone)
            seq = self._waiting.popleft()
            seq.admitted = next(self._admissions)
            seq.slot = self._free_slots.pop()
            self._running[seq] = None
            promised += need

    def _plan_decode(self) -> list[tuple[_Seq, int]]:
        """Every running sequence with only its last token outside the cache and tokens still to make, its
        block for that token taken (preempting the youngest where none is free)."""
        rows = []
        for seq in list(self._running):
            if seq not in self._running or seq.cached != seq.length - 1:
                continue  # preempted above, or still prefilling
            if seq.produced + seq.pending >= seq.request.max_tokens:
                continue  # its last token is in flight
            if self._grow(seq, seq.cached + 1):
                rows.append(seq)
        return [(s, 1) for s in rows if s in self._running]

    def _plan_prefill(self) -> list[tuple[_Seq, int]]:
        """Chunks of the contexts not yet in the cache, oldest sequence first, `prefill_tokens` in all."""
        rows, budget = [], self.prefill_tokens
        for seq in list(self._running):
            left = seq.length - seq.cached
            if left <= 1:
                continue
            n = min(left, budget)
            room = (len(seq.blocks) + len(self._free)) * self.block_size - seq.cached
            n = min(n, room)
            if n <= 0:
                break  # out of blocks: the decodes free some as they finish
            self._grow(seq, seq.cached + n)
            rows.append((seq, n))
            budget -= n
            if budget < 16:
                break
        # At most prefill_tokens // chunk rows of the longest chunk's length. Rows past it wait for the next
        # step (the blocks they took stay theirs).
        return rows[:self.prefill_tokens // _pow2(max((n for _, n in rows), default=1), 16)]

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _grow(self, seq: _Seq, n_tokens: int) -> bool:
        """Blocks for seq's first n_tokens, preempting the youngest running sequences while none is free.
        False if seq itself was preempted."""
        while len(seq.blocks) < self._blocks_for(n_tokens):
            if not self._free:
                victim = max(self._running, key=lambda s: s.admitted)
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.blocks.append(self._free.pop())
        return True

    def _preempt(self, seq: _Seq):
        """Free seq's blocks and queue it first again: it is prefilled anew from its prompt and the tokens it
        has produced (which stay produced: the client saw them)."""
        self.preemptions += 1
        self._release(seq)
        del self._running[seq]
        seq.cached = 0
        self._waiting.appendleft(seq)

    def _release(self, seq: _Seq):
        self._free.extend(reversed(seq.blocks))
        seq.blocks = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def _take_token(self, seq: _Seq, token: int) -> int:
        if token == self.eos_id:
            self._finish(seq, "stop")
            return 0
        seq.tokens.append(token)
        if seq.produced >= seq.request.max_tokens:
            self._finish(seq, "length", [token])
        else:
            self._tell(seq, [token], None)
        return 1

    def _finish(self, seq: _Seq, reason: str, tokens: list[int] | None = None):
        seq.finished = True
        self._release(seq)
        if seq in self._running:
            del self._running[seq]
        elif seq in self._waiting:
            self._waiting.remove(seq)
        self._by_id.pop(seq.id, None)
        self._tell(seq, tokens or [], reason)

    @staticmethod
    def _tell(seq: _Seq, tokens: list[int], finish: str | None):
        try:
            seq.on_tokens(tokens, finish)
        except Exception:  # one caller's broken callback must not end the others' requests
            log.exception("llama-jax engine: request %d's on_tokens raised", seq.id)

    def _fail_all(self, error: Exception):
        """After a failed device call: end every request with "error" and start over with an empty cache
        (a failed call may have consumed the donated pools)."""
        self.last_error = error  # before the callbacks: a caller told "error" can read why
        for seq in list(self._running) + list(self._waiting):
            self._finish(seq, "error")
        self._in_flight = []
        self._reset_device_state()

    def _reset_device_state(self):
        """An empty pool, and int32 [max_batch + 1] slot tokens (the last entry takes padding rows)."""
        self._pool = PagedKVCache.zeros(self.cfg, self.kv_blocks, self.block_size, dtype=self.cache_dtype)
        self._slot_tokens = jnp.zeros(self.max_batch + 1, jnp.int32)

    def _dispatch(self, rows: list[tuple[_Seq, int]]) -> tuple[list[tuple[_Seq, bool]], jax.Array]:
        """Launch one jitted call for rows of (sequence, tokens to feed) and count the fed tokens as cached.
        Returns each row's sequence with whether the row samples its next token (its chunk reaches the end of
        its context), and the sampled tokens of the bucket's rows, the first len(rows) of them real (on the
        device, not waited for). Rows, chunk and table width are bucketed (see the module's docstring)."""
        chunk = max(n for _, n in rows)
        decode = chunk == 1
        seq_len = 1 if decode else _pow2(chunk, 16)
        # A prefill's rows round up to a power of two, so one prompt arriving alone costs its own chunk, not
        # prefill_tokens of padding.
        batch = _pow2(len(rows), 8) if decode else min(_pow2(len(rows), 1), self.prefill_tokens // seq_len)
        width = _pow2(max(len(s.blocks) for s, _ in rows), 8)
        if decode:
            width = max(width, self._decode_width)
        seqs = [seq for seq, _ in rows]
        tokens = np.zeros((batch, seq_len), np.int32)
        positions = np.zeros((batch, seq_len), np.int32)
        mask = np.zeros((batch, seq_len), bool)
        from_slot = np.zeros(batch, bool)
        slots = np.full(batch, self.max_batch, np.int32)  # padding rows write the spare entry
        slots[:len(rows)] = [seq.slot for seq in seqs]
        if decode:  # column by column: a decode step has up to max_batch rows
            # A token still in flight comes from its slot on the device (a prefill never feeds one: it runs
            # only while more than one token is outside the cache, all of them seen by the host).
            from_slot[:len(rows)] = [seq.pending > 0 for seq in seqs]
            tokens[:len(rows), 0] = [0 if seq.pending else seq.tokens[seq.cached] for seq in seqs]
            positions[:len(rows), 0] = [seq.cached for seq in seqs]
            mask[:len(rows), 0] = True
        else:
            for i, (seq, n) in enumerate(rows):
                tokens[i, :n] = seq.tokens[seq.cached:seq.cached + n]
                positions[i, :n] = np.arange(seq.cached, seq.cached + n)
                mask[i, :n] = True
        tables = np.full((batch, width), NO_BLOCK, np.int32)
        for i, seq in enumerate(seqs):
            tables[i, :len(seq.blocks)] = seq.blocks
        last = np.zeros(batch, np.int32)
        last[:len(rows)] = [n - 1 for _, n in rows]
        seeds, steps, top_k = (np.zeros(batch, np.int32) for _ in range(3))
        temperature, top_p = np.zeros(batch, np.float32), np.ones(batch, np.float32)
        seeds[:len(rows)] = [seq.request.seed for seq in seqs]
        steps[:len(rows)] = [seq.produced + seq.pending for seq in seqs]  # the index of the token it samples
        top_k[:len(rows)] = [seq.request.top_k for seq in seqs]
        temperature[:len(rows)] = [seq.request.temperature for seq in seqs]
        top_p[:len(rows)] = [seq.request.top_p for seq in seqs]
        token = self._launch(tables, tokens, from_slot, slots, positions, mask, last, seeds, steps, temperature,
                             top_k, top_p)
        token.copy_to_host_async()  # the host reads it a step later
        fed = []
        for seq, n in rows:
            seq.cached += n
            produces = seq.cached == seq.length
            seq.pending += produces
            fed.append((seq, produces))
        return fed, token  # all the bucket's rows: slicing on the device would compile a slice per row count

    def _launch(self, tables, tokens, from_slot, slots, positions, mask, last, seeds, steps, temperature, top_k,
                top_p) -> jax.Array:
        """forward_and_sample on the engine's pools and slot tokens (both replaced by the call's results)."""
        batch, seq_len = tokens.shape
        self.shapes_dispatched.add((batch, seq_len, tables.shape[1]))
        token, k, v, self._slot_tokens = forward_and_sample(
            self.params, self._pool.k, self._pool.v, self._slot_tokens, tables, tokens, from_slot, slots, positions,
            mask, last, seeds, steps, temperature, top_k, top_p, cfg=self.cfg, kernels=self.kernels,
            unroll=True if seq_len == 1 and self.kernels.decode_unroll else 1, greedy=bool(not temperature.any()))
        self._pool = PagedKVCache(k, v, self._pool.tables)
        return token

    def warm_up(self, progress: bool = False, sampled: bool = True) -> None:
        """Compile the decode step for every row bucket (8 .. max_batch), greedy and (with `sampled`) sampled,
        before a request needs it. On an accelerator a decode program unrolls the layer scan and is the slowest
        to compile (tens of seconds for a 7B model on a GPU), and the first step to reach a bucket would
        otherwise stall every stream while it compiles. The calls feed padding rows only, which write to block
        NO_BLOCK and the spare slot. Tables are the decode width the steps use (with the XLA reference, the
        narrowest); prefill shapes compile on first use. `progress`: a bar on stderr."""
        buckets = [8 << i for i in range((_pow2(self.max_batch, 8) // 8).bit_length())]
        width = self._decode_width or 8
        temperatures = (0.0, 1.0) if sampled else (0.0,)  # greedy, and sampled
        bar = tqdm(total=len(temperatures) * len(buckets), desc="compiling decode steps", unit="program",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        with bar:
            for rows in buckets:
                for temperature in temperatures:
                    zeros = np.zeros((rows, 1), np.int32)
                    token = self._launch(
                        np.full((rows, width), NO_BLOCK, np.int32), zeros, np.zeros(rows, bool),
                        np.full(rows, self.max_batch, np.int32), zeros, np.zeros((rows, 1), bool),
                        np.zeros(rows, np.int32), np.zeros(rows, np.int32), np.zeros(rows, np.int32),
                        np.full(rows, temperature, np.float32), np.zeros(rows, np.int32), np.ones(rows, np.float32))
                    token.block_until_ready()
                    bar.update()
