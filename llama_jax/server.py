"""`llama-jax serve`: an OpenAI-compatible HTTP server over the continuous-batching engine (engine.py).

    POST /v1/completions, POST /v1/chat/completions    "stream": true answers in server-sent events,
                                                       ending with `data: [DONE]`
    GET  /v1/models, /health, /metrics                 /metrics in Prometheus' text format

    app = make_app(engine, tokenizer, "my-model")      # a FastAPI app; any ASGI server runs it
    serve(model, "my-model", listen(port=8000))        # the command: engine, app and uvicorn; SIGTERM drains

The engine works in token ids on a thread of its own; this module turns text into ids (the model's chat
template for chat), hands each request to the engine, and carries its tokens back onto the event loop as
text: decoded as `generate.stream` decodes them, cut at the first stop string, and held back while the
end could still begin one. A client that goes away cancels its request, which frees its blocks.

Answers: 400 for malformed JSON, unknown or out-of-range parameters, n > 1 and prompts that do not fit
the context; 404 for another model's name; 429 when the queue is full; 503 once shutdown has begun. Errors
come as OpenAI's {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llama_jax.engine import Closed, Engine, QueueFull, Request
from llama_jax.tokenizer import chat_tokens

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "stream_options",
          "user"}
COMPLETION_PARAMS = COMMON | {"prompt"}
CHAT_PARAMS = COMMON | {"messages", "max_completion_tokens"}
MAX_STOPS = 4  # as OpenAI's API


class APIError(Exception):
    """An answer other than 200, in OpenAI's error format."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


# ---------------------------------------------------------------------------------------------
# Parameters


def _number(body: dict, name: str, default, *, integer=False, low=None, high=None, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        bounds = f"{'(' if low_open else '['}{low}, {'inf' if high is None else high}]"
        raise APIError(400, f"'{name}' must be in {bounds}, got {value!r}", name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise APIError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return stops


def _prompt_ids(body: dict, tokenizer, chat: bool) -> list[int]:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of {role, content}", "messages")
        plain = []
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, "message content parts must be {type: text, text}", "messages")
                content = "".join(p["text"] for p in content)
            plain.append({"role": m.get("role") if isinstance(m, dict) else None, "content": content})
        try:
            return chat_tokens(tokenizer, plain)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        return ids or [tokenizer.bos_id]  # "" starts from BOS, as generate does
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise APIError(400, "'prompt' must be a string or a list of token ids (one prompt)", "prompt")


def parse(body, tokenizer, model_id: str, context: int, chat: bool) -> tuple[list[int], Request, list[str], bool, bool]:
    """A request's JSON body -> (prompt ids, Request, stop strings, stream, include_usage), or APIError.
    `context`: the most tokens a request may hold, prompt and output."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - (CHAT_PARAMS if chat else COMPLETION_PARAMS))
    if unknown:
        raise APIError(400, f"unknown parameter '{unknown[0]}'", unknown[0])
    if body.get("model") not in (None, model_id):
        raise APIError(404, f"the model '{body['model']}' does not exist; this server has '{model_id}'", "model",
                       "not_found_error")
    if _number(body, "n", 1, integer=True, low=1) != 1:
        raise APIError(400, "only n=1 is supported", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise APIError(400, "'stream_options' takes only include_usage", "stream_options")
    ids = _prompt_ids(body, tokenizer, chat)
    if len(ids) >= context:
        raise APIError(400, f"the prompt has {len(ids)} tokens, more than fit the context of {context} tokens "
                            "with one to generate", "messages" if chat else "prompt")
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, (context - len(ids)) if chat else 16, integer=True, low=1)
    if len(ids) + max_tokens > context:
        raise APIError(400, f"the prompt has {len(ids)} tokens and {name} is {max_tokens}: {len(ids) + max_tokens} "
                            f"tokens, more than the context of {context}", name)
    top_k = _number(body, "top_k", 0, integer=True, low=-1)
    request = Request(max_tokens=max_tokens,
                      temperature=float(_number(body, "temperature", 1.0, low=0)),  # OpenAI's default
                      top_p=float(_number(body, "top_p", 1.0, low=0, high=1, low_open=True)),
                      top_k=max(top_k, 0),  # -1 is off, as in vLLM
                      # Without a seed each request draws its own, as OpenAI's API does.
                      seed=_number(body, "seed", secrets.randbelow(2**31), integer=True, low=0, high=2**31 - 1))
    return ids, request, _stops(body), stream, bool(options.get("include_usage"))


# ---------------------------------------------------------------------------------------------
# Tokens back to text


class TextStream:
    """One request's text as its tokens arrive. Decoded as `generate.stream` decodes: the prompt's last
    tokens go in front (SentencePiece drops a text's first leading space) and are cut off again; a
    character split across byte tokens waits for its last byte. Cut at the first stop string; text that
    could still begin one is held back until the end."""

    def __init__(self, tokenizer, prompt: list[int], stops: list[str]):
        self.tokenizer, self.context, self.stops = tokenizer, list(prompt[-16:]), stops
        self.before = tokenizer.decode(self.context)
        self.new: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.shown = ""  # what has been handed out
        self.stopped = False

    def add(self, tokens: list[int]) -> None:
        if self.stopped or not tokens:
            return
        self.new += tokens
        both = self.tokenizer.decode(self.context + self.new)
        self.text = both[len(self.before):] if both.startswith(self.before) else self.tokenizer.decode(self.new)
        cuts = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True

    def piece(self, final: bool) -> str:
        """The text not yet handed out that is safe to hand out (all of it when final)."""
        text = self.text
        if not final and not self.stopped:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence so far
                return ""
            hold = max((len(s) - 1 for s in self.stops), default=0)
            text = text[:len(text) - hold] if hold else text
        if not text.startswith(self.shown) or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


# ---------------------------------------------------------------------------------------------
# Metrics


class _EngineCollector:
    """The engine's state, read when /metrics is scraped."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, key, doc in (("queue_length", "waiting", "requests waiting to be admitted"),
                               ("running_sequences", "running", "sequences being prefilled or decoded"),
                               ("kv_blocks_in_use", "kv_blocks_used", "KV cache blocks held by sequences"),
                               ("kv_blocks_total", "kv_blocks_total", "KV cache blocks sequences can hold"),
                               ("output_tokens_per_second", "tokens_per_s", "tokens produced a second, last 10 s")):
            yield GaugeMetricFamily(f"llama_jax_{name}", doc, value=s[key])
        yield CounterMetricFamily("llama_jax_output_tokens", "tokens produced", value=s["tokens_out"])
        yield CounterMetricFamily("llama_jax_preemptions", "sequences preempted for blocks", value=s["preemptions"])


class Metrics:
    """The server's Prometheus registry: the engine's gauges and time-to-first-token and inter-token
    histograms (a registry per app, so several apps can live in one process)."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("llama_jax_time_to_first_token_seconds", "from a request's arrival to its first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.itl = Histogram("llama_jax_inter_token_latency_seconds", "between a request's successive tokens",
                             buckets=(.001, .0025, .005, .01, .02, .04, .08, .16, .32, .64, 1.28, 5),
                             registry=self.registry)


# ---------------------------------------------------------------------------------------------
# The app


class _Feed:
    """One request's engine callbacks (on the engine's thread), carried onto the event loop; the latency
    histograms are observed here, as the tokens leave the engine."""

    def __init__(self, loop: asyncio.AbstractEventLoop, metrics: Metrics):
        self.loop, self.metrics = loop, metrics
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrived = self.last = time.monotonic()
        self.first = True  # the next token is the request's first

    def __call__(self, tokens: list[int], finish: str | None) -> None:
        now = time.monotonic()
        for _ in tokens:
            if self.first:
                self.metrics.ttft.observe(now - self.arrived)
            else:
                self.metrics.itl.observe(now - self.last)
            self.first, self.last = False, now
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (tokens, finish))


def make_app(engine: Engine, tokenizer, model_id: str) -> FastAPI:
    """The FastAPI app over a started engine. `app.state.draining = True` turns new requests away with 503."""
    app = FastAPI(title="llama-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.draining = False
    metrics = Metrics(engine)
    # A request holds at most the model's context, and no more than the whole KV cache.
    context = min(engine.cfg.max_seq_len, (engine.kv_blocks - 1) * engine.block_size)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.get("/health")
    async def health():
        if engine.warming:  # requests are queued meanwhile; a load balancer waits for 200
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "draining" if app.state.draining else "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "llama-jax"}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await _answer(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await _answer(request, chat=True)

    async def _answer(http: HTTPRequest, chat: bool):
        if app.state.draining:
            raise APIError(503, "the server is shutting down", kind="service_unavailable")
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        ids, request, stops, stream, usage = parse(body, tokenizer, model_id, context, chat)
        feed = _Feed(asyncio.get_running_loop(), metrics)
        try:
            rid = engine.submit(ids, request, feed)
        except QueueFull as e:
            raise APIError(429, str(e), kind="rate_limit_error") from None
        except Closed as e:
            raise APIError(503, str(e), kind="service_unavailable") from None
        except ValueError as e:
            raise APIError(400, str(e), "messages" if chat else "prompt") from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_id}
        pieces = _pieces(engine, rid, feed, TextStream(tokenizer, ids, stops))
        if stream:
            return StreamingResponse(_events(pieces, head, chat, len(ids), usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.create_task(_cancel_when_gone(http, engine, rid))
        try:
            text, finish, n = "", None, 0
            async for piece, finish, n in pieces:
                text += piece
        finally:
            watcher.cancel()
        if finish == "error":
            raise APIError(500, "the engine failed on this request's step", kind="server_error")
        if finish == "cancelled":  # by shutdown's deadline (a client that left reads nothing)
            raise APIError(503, "the request was cancelled: the server is shutting down", kind="service_unavailable")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else
                  {"index": 0, "text": text})
        return {**head, "object": "chat.completion" if chat else "text_completion",
                "choices": [{**choice, "logprobs": None, "finish_reason": finish}],
                "usage": _usage(len(ids), n)}

    return app


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _pieces(engine: Engine, rid: int, feed: _Feed,
                  text: TextStream) -> AsyncIterator[tuple[str, str | None, int]]:
    """(text piece, finish reason or None, tokens so far) as the engine produces; the request is cancelled in
    the engine if this ends before the engine finished it (a stop string, a client gone)."""
    engine_done = False
    n = 0
    try:
        while True:
            tokens, finish = await feed.queue.get()
            engine_done = finish is not None
            n += len(tokens)
            text.add(tokens)
            if text.stopped:
                finish = "stop"
            piece = text.piece(final=finish is not None)
            if piece or finish:
                yield piece, finish, n
            if finish:
                return
    finally:
        if not engine_done:
            engine.cancel(rid)


async def _cancel_when_gone(http: HTTPRequest, engine: Engine, rid: int) -> None:
    """For an answer not streamed: the body is read, so the next thing the connection says is that the
    client left (starlette notices a streaming client going by itself)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(rid)


async def _events(pieces, head: dict, chat: bool, prompt_len: int, include_usage: bool):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(choices, **extra) -> str:
        return f"data: {json.dumps({**head, 'object': kind, 'choices': choices, **extra})}\n\n"

    if chat:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None}])
    n = 0
    async for piece, finish, n in pieces:
        if finish in ("cancelled", "error"):
            error = {"message": f"the request ended: {finish}", "type": "server_error"}
            yield f"data: {json.dumps({'error': error})}\n\n"
            break
        if piece:
            body = {"delta": {"content": piece}} if chat else {"text": piece}
            yield event([{"index": 0, **body, "logprobs": None, "finish_reason": None}])
        if finish:
            body = {"delta": {}} if chat else {"text": ""}
            yield event([{"index": 0, **body, "logprobs": None, "finish_reason": finish}])
    if include_usage:
        yield event([], usage=_usage(prompt_len, n))
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------------
# The command


class DrainingServer(uvicorn.Server):
    """uvicorn, with SIGTERM and SIGINT draining instead of uvicorn's own handling (which raises the signal
    again once shut down, so the process would not exit 0): the first turns new requests away and closes
    the listening sockets; requests in flight finish within uvicorn's timeout_graceful_shutdown; a
    second SIGINT forces the exit."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self.drain) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    def drain(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.app.state.draining = True
        self.should_exit = True


def listen(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """The listening socket, bound before the model loads, so a port in use fails at once, in one line."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                    backlog=2048)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model, model_id: str, sock: socket.socket, *, max_batch: int = 256, kv_blocks: int | None = None,
          block_size: int = 16, max_queue: int = 1024, prefill_tokens: int = 512, drain_timeout: float = 30.0,
          kernels=None, cache_dtype: str | None = None, warm_up: bool = True, on_ready=None) -> int:
    """Run the server for a `Loaded` model on a socket from `listen` until SIGTERM or SIGINT; returns 0 once
    drained. With `warm_up` the engine compiles its decode steps first (a progress bar on stderr; /health
    answers 503 "warming up" until then). `on_ready(engine)` is called once the engine is built (the command
    prints its size)."""
    engine = Engine(model.params, model.config, eos_id=model.tokenizer.eos_id, max_batch=max_batch,
                    kv_blocks=kv_blocks, block_size=block_size, max_queue=max_queue, prefill_tokens=prefill_tokens,
                    kernels=kernels, cache_dtype=cache_dtype)
    if on_ready is not None:
        on_ready(engine)
    app = make_app(engine, model.tokenizer, model_id)
    engine.start(warm_up=warm_up, progress=warm_up)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=drain_timeout, lifespan="off")
    try:
        DrainingServer(config, app).run(sockets=[sock])
    finally:
        engine.stop(deadline=1.0)  # uvicorn has waited out the drain: what is left is cancelled
    return 0
