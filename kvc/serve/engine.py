"""The serving engine: a request in, an async stream of text pieces and final counts out.

`Engine` is the interface the HTTP app talks to. Issue 11's paged KV cache with continuous batching
will implement it with one scheduler running many sequences in one batch; today's implementation,
`WorkerEngine`, runs N independent workers (threads), each owning its own `kvc.Model` (one sequence,
so one request at a time per worker; the memory-mapped weights are shared by the OS). Requests wait
in one FIFO queue until a worker is free: with N workers, requests beyond N wait (as llama-server
does with `-np N`), and beyond the queue's size they are refused (`QueueFull`, HTTP 503).
"""
from __future__ import annotations

import asyncio
import collections
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

from ..model import Model
from .stops import StopMatcher

BLOCK_SIZE = 16  # positions per KV block, the unit /metrics reports cache use in
SEED_MASK = 2**64 - 1  # the engine's seeds are unsigned 64-bit


# -- requests and events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a chat reply to `messages` (rendered with the model's chat template) or a
    continuation of `prompt` (exactly one of the two is set), `n` times.

    max_tokens None: until the end of turn or the context is full. seed None: a random seed per
    choice; otherwise choice i uses seed + i. stop: the reply is cut before the first of these strings.
    """

    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs
    prompt: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a request has either messages or a prompt")


@dataclass(frozen=True)
class TextDelta:
    """A piece of choice `index`'s text."""

    index: int
    text: str


@dataclass(frozen=True)
class ChoiceFinished:
    """Choice `index` ended: finish_reason "stop" (end of turn or a stop string) or "length"
    (max_tokens or the context is full); completion_tokens: the tokens it sampled."""

    index: int
    finish_reason: str
    completion_tokens: int


@dataclass(frozen=True)
class RequestFinished:
    """Every choice ended (always the last event of a request that did not fail). prompt_tokens:
    the prompt's length; cached_tokens: how many of them the first choice found in the cache;
    prefill_seconds, decode_seconds: the time spent on prompts and on sampled tokens, all choices."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0


@dataclass(frozen=True)
class RequestFailed:
    """The request ended with an error (the last event); bad_request: the request's fault (HTTP 400)."""

    message: str
    bad_request: bool = False


Event = TextDelta | ChoiceFinished | RequestFinished | RequestFailed


class QueueFull(Exception):
    """The engine's queue of waiting requests is full: try again later (HTTP 503)."""


class EngineClosed(Exception):
    """The engine was closed: it takes no more requests."""


class RequestHandle:
    """A submitted request: its events, in order, from `events()`; `cancel()` ends it early.

    Made by Engine.submit() in the event loop's thread; engines call `_emit` from any thread.
    """

    def __init__(self, request: GenerationRequest, on_cancel=None):
        self.request = request
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._on_cancel = on_cancel

    @property
    def cancelled(self) -> bool:
        """Whether cancel() was called (engines check it between tokens)."""
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop the request: a waiting one leaves the queue, a running one stops before its next token
        and frees its worker. The caller stops reading events (a few may still arrive, and no last
        event need come). Safe to call twice or after the end."""
        if self._cancelled.is_set() or self._done.is_set():
            return
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel(self)

    async def events(self) -> AsyncIterator[Event]:
        """The request's events, ending with RequestFinished or RequestFailed."""
        while True:
            event = await self._queue.get()
            yield event
            if isinstance(event, RequestFinished | RequestFailed):
                return

    def _emit(self, event: Event) -> None:
        """Deliver event to events() (thread-safe). Returns quietly once the event loop is gone."""
        if isinstance(event, RequestFinished | RequestFailed):
            self._done.set()
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the loop was closed: nobody is listening any more
            self._cancelled.set()


@dataclass
class EngineMetrics:
    """Counts for /metrics. kv_blocks_*: KV cache positions in blocks of BLOCK_SIZE (today: each
    worker's context, and the positions its cache holds); the *_tokens counters add up every choice
    run (prompt_tokens counts a choice's whole prompt, prefix_cache_hit_tokens the part of it that was
    already in the cache)."""

    workers: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prompt_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    generation_tokens: int = 0
    requests_running: int = 0
    requests_waiting: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by outcome
    requests_rejected: int = 0  # refused with QueueFull
    prefill_seconds: float = 0.0  # time spent running prompts
    decode_seconds: float = 0.0  # time spent sampling and running generated tokens


class Engine(ABC):
    """What the HTTP app needs from an engine."""

    model_name: str
    context_length: int  # positions per sequence: a prompt must be shorter

    @abstractmethod
    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        """The prompt's token ids, as the engine will run them (ValueError if it can't be tokenized).
        Blocking: call it off the event loop."""

    @abstractmethod
    def submit(self, request: GenerationRequest, prompt_tokens: Sequence[int] = ()) -> RequestHandle:
        """Queue request, from the event loop's thread; raises QueueFull or EngineClosed.
        prompt_tokens: what prompt_tokens(request) returned, for placing it by its prefix."""

    @abstractmethod
    def metrics(self) -> EngineMetrics:
        """A snapshot of the engine's counters."""

    @abstractmethod
    def close(self) -> None:
        """Stop: cancel what waits and runs, and free the models."""


# -- today's engine: N workers, each with its own Model ----------------------------------------------


class _Worker:
    """A thread with its own Model (one sequence), running one request at a time."""

    def __init__(self, index: int, model: Model):
        self.index = index
        self.model = model
        self.positions = 0  # positions its cache holds (about: updated per token)
        self.prompt: list[int] = []  # the last chat prompt it ran: how its cache starts
        self.current: RequestHandle | None = None  # the request it runs
        self.assigned: RequestHandle | None = None  # handed to it while idle, not yet taken
        self.idle_since = 0.0
        self.thread: threading.Thread | None = None


class WorkerEngine(Engine):
    """N independent workers, each owning a kvc.Model, taking requests from one FIFO queue.

    A worker runs one request at a time, all its choices one after another (chat() reuses the
    prompt's cached prefix for choices after the first). Requests beyond N wait in the queue, oldest
    first; beyond queue_size waiting ones, submit() raises QueueFull. A chat request that finds
    workers idle goes to one whose last chat prompt its own prompt continues (a later turn of that
    conversation: chat() then computes only the new tokens), else to the one idle longest.

    threads: OpenMP threads per worker (None: the cores divided among the workers). context:
    positions per worker (None: the model's). cache_type_k/_v: as Model's. model_name: the id
    clients see (None: the file's name without its extension).
    """

    def __init__(self, model_path: str | os.PathLike, *, parallel: int = 1, threads: int | None = None,
                 context: int | None = None, cache_type_k: str = "f32", cache_type_v: str = "f32",
                 queue_size: int = 64, model_name: str | None = None):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // parallel)
        path = os.fspath(model_path)
        self.model_name = model_name or os.path.splitext(os.path.basename(path))[0]
        self.queue_size = queue_size
        # a one-position sequence of the same checkpoint, to tokenize prompts without taking a worker
        self._tokenizer = Model(path, seq_len=1, threads=1)
        if not self._tokenizer.has_tokenizer:
            self._tokenizer.close()
            raise ValueError(f"{path} has no tokenizer: the server needs text in and out")
        self._workers: list[_Worker] = []
        try:
            for i in range(parallel):
                model = Model(path, seq_len=context, threads=threads, cache_type_k=cache_type_k,
                              cache_type_v=cache_type_v)
                self._workers.append(_Worker(i, model))
        except BaseException:
            self._close_models()
            raise
        self.context_length = self._workers[0].model.config.seq_len
        self.threads = threads
        self._lock = threading.Lock()  # guards the queue, the workers' states, the counters and _closed
        self._wake = threading.Condition(self._lock)  # a worker was assigned a request, or the engine closed
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._idle: list[_Worker] = []  # workers waiting for a request
        self._closed = False
        self._counts = EngineMetrics(workers=parallel)
        for worker in self._workers:
            worker.thread = threading.Thread(target=self._work, args=(worker,), name=f"kvc-worker-{worker.index}",
                                             daemon=True)
            worker.thread.start()

    # -- the Engine interface ----------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return self._tokenizer.chat_tokens(_messages(request))
        return self._tokenizer.encode(request.prompt, bos=True)

    def submit(self, request: GenerationRequest, prompt_tokens: Sequence[int] = ()) -> RequestHandle:
        handle = RequestHandle(request, on_cancel=self._cancel_waiting)
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if self._idle:
                worker = max(self._idle,
                             key=lambda w: (_continues(w.prompt, prompt_tokens, request), -w.idle_since))
                self._idle.remove(worker)
                worker.assigned = handle
                self._wake.notify_all()
                return handle
            if len(self._waiting) >= self.queue_size:
                self._counts.requests_rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are already waiting for {len(self._workers)} "
                                f"busy worker(s) (queue size {self.queue_size}): try again later")
            self._waiting.append(handle)
        return handle

    def metrics(self) -> EngineMetrics:
        with self._lock:
            m = EngineMetrics(**{k: v for k, v in vars(self._counts).items() if k != "requests_finished"})
            m.requests_finished = dict(self._counts.requests_finished)
            m.requests_running = sum(w.current is not None or w.assigned is not None for w in self._workers)
            m.requests_waiting = len(self._waiting)
        m.kv_blocks_total = sum(_blocks(w.model.config.seq_len) for w in self._workers)
        m.kv_blocks_used = sum(_blocks(w.positions) for w in self._workers)
        return m

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            running = [h for w in self._workers for h in (w.current, w.assigned) if h is not None]
            self._wake.notify_all()
        for handle in waiting + running:
            handle._emit(RequestFailed("the server is shutting down"))
            handle._cancelled.set()  # a running request stops at its next token
        for worker in self._workers:
            if worker.thread is not None:
                worker.thread.join(timeout=30)
        self._close_models()

    def _close_models(self) -> None:
        for worker in self._workers:
            worker.model.close()
        self._tokenizer.close()

    # -- the workers -------------------------------------------------------------------------

    def _cancel_waiting(self, handle: RequestHandle) -> None:
        """A cancelled request leaves the queue at once (a running one stops at its next token)."""
        with self._lock:
            try:
                self._waiting.remove(handle)
            except ValueError:
                return  # already taken by a worker, or finished
            self._counts.requests_finished["cancelled"] = self._counts.requests_finished.get("cancelled", 0) + 1

    def _next(self, worker: _Worker) -> RequestHandle | None:
        """worker's next request: the oldest waiting one, else one handed to it once it is idle
        (blocking); None once the engine is closed."""
        with self._lock:
            if self._waiting and not self._closed:
                worker.current = self._waiting.popleft()
                return worker.current
            worker.idle_since = time.monotonic()
            self._idle.append(worker)
            while worker.assigned is None and not self._closed:
                self._wake.wait()
            if self._closed:
                return None
            worker.current, worker.assigned = worker.assigned, None
            return worker.current

    def _work(self, worker: _Worker) -> None:
        while (handle := self._next(worker)) is not None:
            outcome, last = "failed", None
            try:
                outcome, last = self._serve(worker, handle)
            except ValueError as e:  # what Model refuses: the request's fault
                last = RequestFailed(str(e), bad_request=True)
            except Exception as e:  # a worker survives anything a request does
                last = RequestFailed(f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    worker.current = None
                    finished = self._counts.requests_finished
                    finished[outcome] = finished.get(outcome, 0) + 1
            if last is not None:  # after the counts: a client that has its answer sees the worker free
                handle._emit(last)

    def _serve(self, worker: _Worker, handle: RequestHandle) -> tuple[str, RequestFinished | None]:
        """Run every choice of handle's request on worker's model: the outcome for metrics ("ok" or
        "cancelled") and the request's last event (None when cancelled)."""
        request, model = handle.request, worker.model
        prompt_tokens = cached_tokens = completion_tokens = 0
        prefill = decode = 0.0
        for index in range(request.n):
            if handle.cancelled:
                return "cancelled", None
            seed = None if request.seed is None else (request.seed + index) & SEED_MASK
            max_tokens = self.context_length if request.max_tokens is None else request.max_tokens
            args = dict(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                        top_k=request.top_k, seed=seed)
            if request.messages is not None:
                worker.prompt = model.chat_tokens(_messages(request))
                pieces = model.chat(_messages(request), **args)
            else:
                worker.prompt = []  # generate() starts from an empty cache: nothing to reuse
                pieces = model.generate(request.prompt, **args)
            finish = self._run_choice(worker, handle, index, pieces)
            stats = model.stats
            whole_prompt = stats.prompt_tokens + stats.cached_tokens
            with self._lock:
                self._counts.prompt_tokens += whole_prompt
                self._counts.prefix_cache_hit_tokens += stats.cached_tokens
                self._counts.generation_tokens += stats.generated_tokens
                self._counts.prefill_seconds += stats.prefill_seconds
                self._counts.decode_seconds += stats.decode_seconds
            if finish is None:
                return "cancelled", None
            if index == 0:
                prompt_tokens, cached_tokens = whole_prompt, stats.cached_tokens
            completion_tokens += stats.generated_tokens
            prefill, decode = prefill + stats.prefill_seconds, decode + stats.decode_seconds
            handle._emit(ChoiceFinished(index, finish, stats.generated_tokens))
        return "ok", RequestFinished(prompt_tokens, cached_tokens, completion_tokens, prefill, decode)

    def _run_choice(self, worker: _Worker, handle: RequestHandle, index: int, pieces: Iterator[str]) -> str | None:
        """Stream one choice's pieces to handle through its stop strings; the finish reason, or None
        when the request was cancelled. The cancel flag is checked after every piece."""
        stops = StopMatcher(handle.request.stop)
        model = worker.model
        try:
            for piece in pieces:
                stats = model.stats
                # fed so far: the prompt, and every sampled token but the last
                worker.positions = stats.cached_tokens + stats.prompt_tokens + max(stats.generated_tokens - 1, 0)
                text, hit = stops.feed(piece)
                if text:
                    handle._emit(TextDelta(index, text))
                if hit:
                    return "stop"
                if handle.cancelled:
                    return None
        finally:
            pieces.close()  # a generator left early (a stop string, a cancel) ends here
            stats = model.stats
            fed = stats.cached_tokens + stats.prompt_tokens + stats.generated_tokens
            worker.positions = min(fed - (stats.stop_reason != "stop"), model.config.seq_len)
        rest = stops.finish()
        if rest:
            handle._emit(TextDelta(index, rest))
        return "stop" if model.stats.stop_reason == "stop" else "length"  # "length" or "context"


def _messages(request: GenerationRequest) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in request.messages]


def _blocks(positions: int) -> int:
    return math.ceil(positions / BLOCK_SIZE)


def _continues(cached: Sequence[int], prompt: Sequence[int], request: GenerationRequest) -> int:
    """How much of a chat prompt a worker whose last chat prompt was `cached` can reuse, counted only
    when all of `cached` starts prompt (a later turn of the same conversation, or the same prompt
    again); 0 otherwise. Conversations that merely share a system prompt score 0, so a new one goes to
    the worker idle longest instead of evicting another conversation that may go on."""
    if request.messages is None or not cached or len(cached) > len(prompt):
        return 0
    return len(cached) if list(prompt[:len(cached)]) == list(cached) else 0
