"""The serving engine: a request in, an async stream of text pieces and final counts out.

`Engine` is the interface the HTTP app talks to; `BatchEngine` implements it with continuous
batching on one paged KV cache (`kvc.Pool`): one background thread runs a `Scheduler`, whose every
step is one `Pool.step` over all running sequences (their next tokens, and chunks of new prompts),
then samples each sequence's next token with its own `kvc.Sampler` and streams its text through
its stop strings. Requests join and leave between steps; beyond `parallel` running sequences they
wait, and beyond the queue's size they are refused (`QueueFull`, HTTP 503). Between two steps the
thread also runs the slot jobs: a conversation's cache saved to a session file (`save_slot`) or
loaded from one into the prefix cache (`restore_slot`).
"""
from __future__ import annotations

import asyncio
import codecs
import collections
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..model import Model
from ..pool import window_rows
from ..sampler import Sampler
from .scheduler import DEFAULT_MAX_STEP_TOKENS, Choice, ScheduledRequest, Scheduler, StepOutput
from .stops import StopMatcher

SEED_MASK = 2**64 - 1  # the engine's seeds are unsigned 64-bit
RATE_WINDOW_SECONDS = 10.0  # generation_tokens_per_second: the tokens sampled over this last stretch


# -- requests and events ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: a chat reply to `messages` (rendered with the model's chat template) or a
    continuation of `prompt` (exactly one of the two is set), `n` times.

    max_tokens None: until the end of turn or the context is full. seed None: a random seed per
    choice; otherwise choice i uses seed + i. stop: the reply is cut before the first of these strings.
    ignore_eos: the end-of-text and end-of-turn tokens do not end the reply (benchmarks: a reply of
    exactly max_tokens tokens).
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
    ignore_eos: bool = False

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


@dataclass(frozen=True)
class SlotResult:
    """A conversation's cache saved to or restored from a session file: its tokens, the file's bytes,
    and the seconds the engine thread spent on it (the running requests wait meanwhile)."""

    tokens: int
    bytes: int
    seconds: float


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
        and frees its KV blocks. The caller stops reading events (a few may still arrive, and no last
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
    """Counts for /metrics. kv_blocks_*: the paged KV cache in blocks of block_size positions (used:
    held by running sequences; cached: held by none, keeping prompts' blocks for prefix reuse).
    prompt_tokens counts each request's prompt once, prefix_cache_hit_tokens the part of it found in
    the cache; generation_tokens every token sampled, all choices."""

    parallel: int = 0  # most sequences running at once
    block_size: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    prompt_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    generation_tokens: int = 0
    requests_running: int = 0  # requests with a sequence in the pool
    requests_waiting: int = 0  # the others (new, or preempted)
    requests_finished: dict[str, int] = field(default_factory=dict)  # by outcome
    requests_rejected: int = 0  # refused with QueueFull
    preemptions: int = 0  # sequences whose blocks were freed for others (to be recomputed later)
    prefill_seconds: float = 0.0  # step time spent on prompt tokens (shared out by tokens per step)
    decode_seconds: float = 0.0  # step time spent on generated tokens
    generation_tokens_per_second: float = 0.0  # over the last RATE_WINDOW_SECONDS
    slot_saves: int = 0  # session files written by save_slot
    slot_restores: int = 0  # session files loaded by restore_slot


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
        prompt_tokens: what prompt_tokens(request) returned (empty: the engine tokenizes it). A
        request the engine can never run (its prompt and max_tokens do not fit in the KV cache)
        ends with RequestFailed(bad_request=True)."""

    @abstractmethod
    def save_slot(self, prompt_tokens: Sequence[int], path: str) -> "Future[SlotResult]":
        """Run what the cache does not hold of prompt_tokens (a prompt_tokens() result), write its
        sequence to the session file path, and free it (its full blocks stay in the prefix cache).
        From the event loop's thread; raises EngineClosed. The future raises ValueError (it can never
        fit: the request's fault), PoolFull (no blocks now) or OSError (the file was not written)."""

    @abstractmethod
    def restore_slot(self, path: str) -> "Future[SlotResult]":
        """Load the session file path into the KV cache and free it: its full blocks join the prefix
        cache, for the requests whose prompts start with its tokens. From the event loop's thread;
        raises EngineClosed. The future raises FileNotFoundError, ValueError (a file that does not
        fit: another model, cache type or block size, truncated or corrupt) or PoolFull."""

    @abstractmethod
    def metrics(self) -> EngineMetrics:
        """A snapshot of the engine's counters."""

    @abstractmethod
    def close(self) -> None:
        """Stop: end what waits and runs (RequestFailed), and free the model."""




# -- the engine: continuous batching on one paged KV cache -------------------------------------------


class _ChoiceText:
    """A choice's text so far: UTF-8 bytes to text across tokens, then stop strings."""

    def __init__(self, prev: int, stops: Sequence[str]):
        self.prev = prev  # the last token (a token's text depends on the one before)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = StopMatcher(stops)
        self.done = False


class _Live:
    """A request the engine thread runs: its handle, its scheduled form, its choices' text and time."""

    def __init__(self, handle: RequestHandle, prompt: Sequence[int]):
        self.handle = handle
        self.prompt = list(prompt)
        self.scheduled: ScheduledRequest | None = None  # once started
        self.texts: list[_ChoiceText] = []
        self.open_choices = handle.request.n
        self.prefill_seconds = 0.0
        self.decode_seconds = 0.0


class BatchEngine(Engine):
    """Continuous batching of every request on one paged KV cache (`kvc.Pool`), run by one thread.

    parallel: most sequences (choices) running at once; beyond them requests wait in FIFO order, and
    beyond queue_size waiting ones submit() raises QueueFull. kv_blocks or kv_memory (bytes): the
    pool's size (neither: one full context); block_size: positions per block. threads: the pool's
    threads (None: its default). context: positions per sequence (None: the model's). window,
    sinks: every sequence keeps its first sinks and last window positions (kvc.Model's window=), and
    a request with max_tokens runs on past the context.
    max_step_tokens: most tokens one step runs (long prompts are run in chunks beside the others'
    decoding). cache_type_k/_v: as Model's. model_name: the id clients see (None: the file's name
    without its extension).
    """

    def __init__(self, model_path: str | os.PathLike, *, parallel: int = 1, kv_blocks: int | None = None,
                 kv_memory: int | None = None, block_size: int = 16, threads: int | None = None,
                 context: int | None = None, cache_type_k: str = "f32", cache_type_v: str = "f32",
                 max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS, queue_size: int = 64,
                 model_name: str | None = None, window: int | None = None, sinks: int | None = None):
        if queue_size < 0:
            raise ValueError(f"queue_size must be >= 0, got {queue_size}")
        path = os.fspath(model_path)
        self.model_name = model_name or os.path.splitext(os.path.basename(path))[0]
        self.queue_size = queue_size
        # the model's tokenizer, templates and token texts; its own small cache goes unused
        self._model = Model(path, seq_len=16, threads=1)
        self._pool = None
        try:
            if not self._model.has_tokenizer:
                raise ValueError(f"{path} has no tokenizer: the server needs text in and out")
            if kv_blocks is None and kv_memory is None:  # every running sequence can reach the context
                with self._model.pool(blocks=1, block_size=block_size) as probe:  # (for the model's context)
                    seq_len = probe.max_seq_len if context is None else min(context, probe.max_seq_len)
                if window is not None:  # a windowed sequence never holds more than its sinks' blocks and its window
                    seq_len = min(seq_len, window_rows(window, sinks, block_size))
                kv_blocks = parallel * -(-seq_len // block_size)
            self._pool = self._model.pool(blocks=kv_blocks, memory=kv_memory, block_size=block_size,
                                          threads=threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v)
            self._scheduler = Scheduler(self._pool, parallel=parallel, max_step_tokens=max_step_tokens,
                                        context=context, window=window, sinks=sinks)
        except BaseException:
            self._close_model()
            raise
        self.context_length = self._scheduler.context
        self.parallel = parallel
        self.threads = threads
        self.block_size = self._pool.block_size
        self.blocks_total = self._pool.blocks_total
        self._chat_stops = {self._model.end_of_turn, self._model.config.eos_id} - {-1}
        self._text_stops = {self._model.config.eos_id} - {-1}
        self._lock = threading.Lock()  # guards what the app's thread and the engine's share (below)
        self._wake = threading.Condition(self._lock)  # work arrived, or the engine closed
        self._inbox: list[_Live] = []  # submitted, not yet taken by the engine thread
        self._cancels: list[RequestHandle] = []  # cancelled, not yet seen by the engine thread
        self._jobs: collections.deque[_Job] = collections.deque()  # slot saves and restores, in order
        self._closed = False
        self._free_slots = parallel  # running sequences the scheduler could still start, as last seen
        self._counts = EngineMetrics(parallel=parallel, block_size=self.block_size)
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens sampled)
        self._live: dict[RequestHandle, _Live] = {}  # the engine thread's own: started, not ended
        self._outbox: list[tuple[RequestHandle, Event]] = []  # events of this round, sent after _publish
        self._thread = threading.Thread(target=self._run, name="kvc-engine", daemon=True)
        self._thread.start()

    # -- the Engine interface ----------------------------------------------------------------

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        if request.messages is not None:
            return self._model.chat_tokens(_messages(request))
        return self._model.encode(request.prompt, bos=True)

    def submit(self, request: GenerationRequest, prompt_tokens: Sequence[int] = ()) -> RequestHandle:
        handle = RequestHandle(request, on_cancel=self._cancel)
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            waiting = self._counts.requests_waiting + len(self._inbox)
            if waiting - self._free_slots >= self.queue_size:
                self._counts.requests_rejected += 1
                raise QueueFull(f"{waiting} requests are already waiting for the {self.parallel} running "
                                f"sequence(s) (queue size {self.queue_size}): try again later")
            self._inbox.append(_Live(handle, prompt_tokens))
            self._wake.notify_all()
        return handle

    def save_slot(self, prompt_tokens: Sequence[int], path: str) -> "Future[SlotResult]":
        tokens = list(prompt_tokens)
        return self._queue_job(lambda: self._save_work(tokens, path))

    def restore_slot(self, path: str) -> "Future[SlotResult]":
        return self._queue_job(lambda: self._restore_work(path))

    def metrics(self) -> EngineMetrics:
        stats = self._pool.stats()
        with self._lock:
            m = EngineMetrics(**{k: v for k, v in vars(self._counts).items() if k != "requests_finished"})
            m.requests_finished = dict(self._counts.requests_finished)
            m.requests_waiting += len(self._inbox)
            rate = list(self._rate)
        m.kv_blocks_total, m.kv_blocks_used, m.kv_blocks_cached = stats.total, stats.used, stats.cached
        now = time.monotonic()
        recent = [(t, n) for t, n in rate if t > now - RATE_WINDOW_SECONDS]
        if recent:
            m.generation_tokens_per_second = sum(n for _, n in recent) / max(now - recent[0][0], 1.0)
        return m

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout=30)  # it stops after its current step
        with self._lock:
            ended = [live.handle for live in self._inbox] + list(self._live)
            self._inbox = []
            jobs, self._jobs = list(self._jobs), collections.deque()
        for handle in ended:
            handle._emit(RequestFailed("the server is shutting down"))
        self._live.clear()
        for job in jobs:
            job.future.set_exception(EngineClosed("the server is shutting down"))
        self._close_model()

    def _queue_job(self, work: Callable[[], SlotResult]) -> "Future[SlotResult]":
        """Queue work for the engine thread, which runs it between two steps."""
        job = _Job(work, Future())
        with self._lock:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            self._jobs.append(job)
            self._wake.notify_all()
        return job.future

    def _close_model(self) -> None:
        if self._pool is not None:
            self._pool.close()
        self._model.close()

    # -- the engine thread -------------------------------------------------------------------

    def _cancel(self, handle: RequestHandle) -> None:
        """A cancelled request: one still in the inbox leaves it here; the engine thread frees a
        started one's blocks before its next step."""
        with self._lock:
            for live in self._inbox:
                if live.handle is handle:
                    self._inbox.remove(live)
                    self._count_finished("cancelled")
                    return
            self._cancels.append(handle)
            self._wake.notify_all()

    def _count_finished(self, outcome: str) -> None:
        """Count a request's end; the caller holds self._lock."""
        finished = self._counts.requests_finished
        finished[outcome] = finished.get(outcome, 0) + 1

    def _run(self) -> None:
        """Take what arrived, run a step, deliver its tokens; sleep while there is nothing to do."""
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or self._jobs or self._scheduler.has_work or self._closed):
                    self._wake.wait()
                if self._closed:
                    return
                job = self._jobs.popleft() if self._jobs else None
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                # they wait until _publish says otherwise: submit()'s queue check must not miss them
                # while the step below runs
                self._counts.requests_waiting += len(inbox)
            for handle in cancels:
                live = self._live.pop(handle, None)
                if live is not None and live.scheduled is not None:
                    self._scheduler.cancel(live.scheduled)
                    self._end_request(live, "cancelled")
            for live in inbox:
                self._start(live)
            if job is not None:
                self._run_job(job)
            if self._scheduler.has_work:
                try:
                    out = self._scheduler.step()
                except Exception as e:  # the engine survives anything a step does: its requests fail
                    self._fail_all(f"{type(e).__name__}: {e}")
                else:
                    self._deliver(out)
            self._publish()
            # events after the counts: a client that saw a token sees its request running, and one
            # that has its answer sees it gone
            for handle, event in self._outbox:
                handle._emit(event)
            self._outbox.clear()

    def _run_job(self, job: "_Job") -> None:
        """Run job and answer its future."""
        try:
            job.future.set_result(job.work())
        except Exception as e:  # the caller's to answer (ValueError, PoolFull, OSError, ...)
            job.future.set_exception(e)

    def _save_work(self, tokens: list[int], path: str) -> SlotResult:
        """save_slot's work, all of it between two steps (so the scheduler never meets blocks held by a
        sequence it does not know): the tokens the prefix cache lacks run in chunks of max_step_tokens,
        then the sequence is written and freed."""
        t0 = time.perf_counter()
        problem = self._scheduler.check(len(tokens), None)
        if problem is not None:
            raise ValueError(problem)
        seq = self._pool.sequence()
        try:
            done = seq.reuse_prefix(tokens)
            while done < len(tokens):
                chunk = tokens[done:done + self._scheduler.max_step_tokens]
                self._pool.step([(seq, chunk)])
                done += len(chunk)
            try:
                seq.save_state(path)
            except ValueError as e:  # the C library could not write it: the server's fault
                raise OSError(str(e)) from None
        finally:
            seq.free()  # its full blocks stay cached
        return self._slot_done("slot_saves", len(tokens), path, t0)

    def _restore_work(self, path: str) -> SlotResult:
        """restore_slot's work."""
        t0 = time.perf_counter()
        seq = self._pool.load_state(path)
        tokens = seq.len
        seq.free()  # its full blocks join the prefix cache
        return self._slot_done("slot_restores", tokens, path, t0)

    def _slot_done(self, counter: str, tokens: int, path: str, t0: float) -> SlotResult:
        """Count a finished save or restore; its result."""
        with self._lock:
            setattr(self._counts, counter, getattr(self._counts, counter) + 1)
        return SlotResult(tokens, os.path.getsize(path), time.perf_counter() - t0)

    def _start(self, live: _Live) -> None:
        """Hand a submitted request to the scheduler, or fail it (the request's fault)."""
        request = live.handle.request
        try:
            if not live.prompt:
                live.prompt = self.prompt_tokens(request)
            samplers = [Sampler(self._model.config.vocab_size, temperature=request.temperature, top_p=request.top_p,
                                top_k=request.top_k,
                                seed=None if request.seed is None else (request.seed + i) & SEED_MASK)
                        for i in range(request.n)]
            stop_ids = self._chat_stops if request.messages is not None else self._text_stops
            if request.ignore_eos:
                stop_ids = set()
            live.scheduled = ScheduledRequest(prompt=live.prompt, samplers=samplers, max_tokens=request.max_tokens,
                                              stop_ids=stop_ids, tag=live)
            self._scheduler.add(live.scheduled)
        except ValueError as e:
            self._outbox.append((live.handle, RequestFailed(str(e), bad_request=True)))
            with self._lock:
                self._count_finished("failed")
            return
        live.texts = [_ChoiceText(live.prompt[-1], request.stop) for _ in range(request.n)]
        self._live[live.handle] = live
        with self._lock:
            self._counts.prompt_tokens += len(live.prompt)

    def _deliver(self, out: StepOutput) -> None:
        """A step's results to their requests: time, text (through stop strings), ends."""
        total = sum(n for _, n, _ in out.batch)
        prefill = decode = 0.0
        for choice, n, decoding in out.batch:
            share = out.seconds * n / total
            live = choice.request.tag
            if decoding:
                live.decode_seconds += share
                decode += share
            else:
                live.prefill_seconds += share
                prefill += share
        for choice, token in out.sampled:
            live = choice.request.tag
            text = live.texts[choice.index]
            data = self._model.token_bytes(text.prev, token)
            text.prev = token
            if not text.done and self._send(live, choice.index, text.decoder.decode(data)):
                self._scheduler.finish(choice, "stop")  # at a stop string: its blocks go now (if it runs)
                self._end_choice(live, choice, "stop")
        for choice in out.finished:
            live = choice.request.tag
            if choice.finish_reason == "cancelled" or live.texts[choice.index].done:
                continue
            text = live.texts[choice.index]
            if self._send(live, choice.index, text.decoder.decode(b"", final=True)):
                self._end_choice(live, choice, "stop")
                continue
            rest = text.stops.finish()
            if rest:
                self._outbox.append((live.handle, TextDelta(choice.index, rest)))
            self._end_choice(live, choice, choice.finish_reason)
        with self._lock:
            self._counts.generation_tokens += len(out.sampled)
            self._counts.prefill_seconds += prefill
            self._counts.decode_seconds += decode
            self._rate.append((time.monotonic(), len(out.sampled)))
            while self._rate and self._rate[0][0] < time.monotonic() - RATE_WINDOW_SECONDS:
                self._rate.popleft()

    def _send(self, live: _Live, index: int, piece: str) -> bool:
        """piece of choice index's text to the client through its stop strings; whether one hit."""
        if not piece:
            return False
        text, hit = live.texts[index].stops.feed(piece)
        if text:
            self._outbox.append((live.handle, TextDelta(index, text)))
        return hit

    def _end_choice(self, live: _Live, choice: Choice, reason: str) -> None:
        """Choice ended with reason: tell the client, and end the request after its last choice."""
        live.texts[choice.index].done = True
        self._outbox.append((live.handle, ChoiceFinished(choice.index, reason, choice.generated)))
        live.open_choices -= 1
        if live.open_choices == 0:
            scheduled = live.scheduled
            self._outbox.append((live.handle, RequestFinished(
                len(live.prompt), scheduled.cached_tokens, sum(c.generated for c in scheduled.choices),
                live.prefill_seconds, live.decode_seconds)))
            del self._live[live.handle]
            self._end_request(live, "ok")

    def _end_request(self, live: _Live, outcome: str) -> None:
        with self._lock:
            self._counts.prefix_cache_hit_tokens += live.scheduled.cached_tokens
            self._count_finished(outcome)

    def _fail_all(self, message: str) -> None:
        """A step failed (not the requests' fault): end every started request with the error."""
        for live in list(self._live.values()):
            self._scheduler.cancel(live.scheduled)
            self._outbox.append((live.handle, RequestFailed(message)))
            self._end_request(live, "failed")
        self._live.clear()

    def _publish(self) -> None:
        """The scheduler's state, for metrics() and submit()'s queue check."""
        running = {c.request for c in self._scheduler.running}
        with self._lock:
            self._counts.requests_running = len(running)
            self._counts.requests_waiting = len(self._live) - len(running)
            self._counts.preemptions = self._scheduler.preemptions
            self._free_slots = self.parallel - len(self._scheduler.running)


@dataclass(frozen=True)
class _Job:
    """Work the engine thread runs between two steps (it owns the pool); its value answers future."""

    work: Callable[[], SlotResult]
    future: "Future[SlotResult]"


def _messages(request: GenerationRequest) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in request.messages]
