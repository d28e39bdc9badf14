"""Continuous batching on a paged KV cache (vLLM-style), as pure logic: no threads, no text.

A `Scheduler` owns a `kvc.Pool` and the requests running on it. Each `step()` builds one batch for
`Pool.step`: first the next token of every running sequence that is decoding (oldest first), then
chunks of the prompts of running sequences still prefilling, then the start of waiting sequences,
all under `max_step_tokens` tokens per step and at most `parallel` running sequences. A long prompt
is thus run a chunk per step beside the others' decoding instead of stalling it. Requests join (`add`)
and leave (`finish`, `cancel`) between steps.

A sequence is its tokens (the prompt, then what it sampled) and, while it runs, a PoolSequence
holding the K/V of the first `seq.len` of them; what the pool does not hold yet is run next. So
a new sequence first attaches the cached blocks its prompt starts with (`reuse_prefix`), and a
preempted one is simply freed and put back at the front of the waiting queue: when it runs again it
recomputes its prompt and the tokens it sampled so far (again from whatever prefix blocks are still
cached), keeping its sampler, so its output is as if it had never stopped and nothing it already
sampled is sampled (or sent) again.

When the pool is short of blocks, the most recently started running sequence is preempted (until
the work fits, or the one needing blocks is itself the most recent). A sequence that cannot grow
even alone in the pool ends with "length". A request whose prompt and max_tokens cannot fit even
alone in the whole pool is refused up front (`check`).

A request with n > 1 choices runs its prompt once; when the prompt's logits come back its other
choices are forked from it (sharing every block of the prompt, copy-on-write), as many as there are
free running slots; the rest start as preempted sequences (the prompt and their first token).
"""
from __future__ import annotations

import collections
import itertools
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from ..pool import PoolFull, window_rows

DEFAULT_MAX_STEP_TOKENS = 256


class TokenSampler(Protocol):
    """What picks a choice's next token from its logits (kvc.Sampler)."""

    def sample(self, logits: np.ndarray) -> int: ...


class Choice:
    """One sequence of a request: choice `index` of `request`.

    tokens: the prompt and the tokens sampled so far; generated: how many were sampled (stop
    tokens are not sampled tokens); finish_reason: None while it runs or waits, then "stop",
    "length" or "cancelled". seq: the PoolSequence while it is running, else None.
    """

    def __init__(self, request: "ScheduledRequest", index: int, tokens: Sequence[int]):
        self.request = request
        self.index = index
        self.tokens = list(tokens)
        self.generated = 0
        self.finish_reason: str | None = None
        self.seq: Any = None  # kvc.PoolSequence while running
        self.started = 0  # when it last started running (the scheduler's counter): preemption order

    @property
    def sampler(self) -> TokenSampler:
        return self.request.samplers[self.index]

    def __repr__(self) -> str:
        return (f"Choice({self.index}, tokens={len(self.tokens)}, generated={self.generated}, "
                f"running={self.seq is not None}, finish={self.finish_reason})")


@dataclass(eq=False)
class ScheduledRequest:
    """A request as the scheduler runs it: `n` choices continuing `prompt`, choice i sampled by
    samplers[i], each ending at a token of stop_ids ("stop"), after max_tokens sampled tokens or
    when the context is full ("length"). tag: the caller's own data (the engine's handle).

    cached_tokens: how many prompt tokens the first choice found in the prefix cache when it started.
    """

    prompt: list[int]
    samplers: Sequence[TokenSampler]
    max_tokens: int | None = None
    stop_ids: Collection[int] = ()
    tag: Any = None
    cached_tokens: int = 0
    cancelled: bool = False
    choices: list[Choice] = field(default_factory=list)  # created as they start: choice 0, then the forks

    @property
    def n(self) -> int:
        return len(self.samplers)

    @property
    def done(self) -> bool:
        """Every choice ended (a cancelled request's choices not forked yet never start)."""
        return ((len(self.choices) == self.n or self.cancelled)
                and all(c.finish_reason is not None for c in self.choices))


@dataclass
class StepOutput:
    """What one step did. batch: (choice, tokens run, whether they were a decode token) per sequence
    run; sampled: (choice, token) per token sampled, in order; finished: the choices that ended
    (finish_reason set), after their last sampled token; seconds: the time Pool.step took."""

    batch: list[tuple[Choice, int, bool]] = field(default_factory=list)
    sampled: list[tuple[Choice, int]] = field(default_factory=list)
    finished: list[Choice] = field(default_factory=list)
    seconds: float = 0.0


class Scheduler:
    """Continuous batching of requests' choices on `pool` (see the module's docstring).

    parallel: most sequences running at once. max_step_tokens: most tokens one step runs (decode
    tokens and prompt chunks together). context: positions per sequence (None or more than the
    pool's max_seq_len: the pool's). window, sinks: every sequence keeps its first `sinks` and its
    last `window` positions (kvc.Model's window=) and runs on past the context when max_tokens asks.
    """

    def __init__(self, pool: Any, *, parallel: int = 1, max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS,
                 context: int | None = None, window: int | None = None, sinks: int | None = None):
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        if max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        if context is not None and context < 2:
            raise ValueError(f"context must be >= 2, got {context}")
        self.pool = pool
        self.parallel = parallel
        self.max_step_tokens = max_step_tokens
        self.context = pool.max_seq_len if context is None else min(context, pool.max_seq_len)
        self.window = window
        self.sinks = sinks  # None: the default, as Pool.sequence and window_rows take it
        if window is not None:  # refused here, before any request, when the pool cannot make one
            self._new_sequence().free()
        self.preemptions = 0  # sequences preempted so far
        self._running: list[Choice] = []  # in the order they started
        self._waiting: collections.deque[Choice] = collections.deque()
        self._requests: list[ScheduledRequest] = []  # added and not done
        self._ended: list[Choice] = []  # ended outside a step (max_tokens 0): reported by the next step
        self._clock = itertools.count(1)

    # -- requests in and out ---------------------------------------------------------------------

    def check(self, prompt_tokens: int, max_tokens: int | None) -> str | None:
        """Why a request with this prompt length and max_tokens can never run here, or None if it can.

        It must fit alone in the pool: its prompt, and (max_tokens given) every sampled token but
        the last, up to the context's end. With max_tokens None only the prompt must fit: the reply
        then ends with "length" where even alone it can get no more blocks.
        """
        if prompt_tokens < 1:
            return "the prompt has no tokens"
        if prompt_tokens >= self.context:
            return f"the prompt is {prompt_tokens} tokens but the context holds {self.context}"
        positions = prompt_tokens if max_tokens is None else min(prompt_tokens + max(max_tokens, 1) - 1, self.context)
        if self.window is not None:  # a window holds its sinks' blocks and itself, however long it runs
            positions = min(positions, window_rows(self.window, self.sinks, self.pool.block_size))
        blocks = math.ceil(positions / self.pool.block_size)
        if blocks > self.pool.blocks_total:
            what = "the prompt" if max_tokens is None else f"the prompt ({prompt_tokens} tokens) and max_tokens"
            return (f"{what} need {positions} KV positions ({blocks} blocks of {self.pool.block_size}) but the "
                    f"whole KV cache has {self.pool.blocks_total} blocks: shorten it"
                    + ("" if max_tokens is None else " or lower max_tokens"))
        return None

    def add(self, request: ScheduledRequest) -> None:
        """Queue request behind the waiting ones. Raises ValueError when `check` refuses it."""
        if request.n < 1:
            raise ValueError("a request has at least one choice")
        problem = self.check(len(request.prompt), request.max_tokens)
        if problem is not None:
            raise ValueError(problem)
        first = Choice(request, 0, request.prompt)
        request.choices = [first]
        self._requests.append(request)
        if request.max_tokens == 0:  # nothing to sample: every choice ends at once (reported by step())
            request.choices += [Choice(request, i, request.prompt) for i in range(1, request.n)]
            for choice in request.choices:
                self._end(choice, "length")
            return
        self._waiting.append(first)

    def finish(self, choice: Choice, reason: str) -> None:
        """End choice now (e.g. "stop" at a stop string): its blocks are freed before the next step."""
        if choice.finish_reason is None:
            self._end(choice, reason, report=False)
            self._forget_if_done(choice.request)

    def cancel(self, request: ScheduledRequest) -> None:
        """End every choice of request ("cancelled"), freeing their blocks; its choices not forked yet
        never start. Safe on a request that already ended."""
        request.cancelled = True
        for choice in request.choices:
            self.finish(choice, "cancelled")
        self._forget_if_done(request)

    # -- state -----------------------------------------------------------------------------------

    @property
    def has_work(self) -> bool:
        """Whether step() has anything to do (a sequence to run, or an ended choice to report)."""
        return bool(self._running or self._waiting or self._ended)

    @property
    def requests(self) -> list[ScheduledRequest]:
        """The requests added and not yet done, oldest first."""
        return list(self._requests)

    @property
    def running(self) -> list[Choice]:
        """The sequences holding blocks in the pool, in the order they started."""
        return list(self._running)

    @property
    def waiting(self) -> list[Choice]:
        """The sequences waiting to start (new ones, and preempted ones at the front), in order."""
        return list(self._waiting)

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> StepOutput:
        """Run one batch: plan it, run it on the pool, sample every sequence whose pending tokens all
        ran. On PoolFull (the plan was short of blocks after all) the newest running sequence is
        preempted (ended with "length" if it is alone) and the batch planned again, this time
        starting nothing new."""
        out = StepOutput()
        admit = True
        while plan := self._plan(admit):
            work = [(c.seq, c.tokens[c.seq.len:c.seq.len + n]) for c, n in plan]
            t0 = time.perf_counter()
            try:
                logits = self.pool.step(work)
            except PoolFull:
                admit = False
                self._evict(self._running[-1])
                continue
            out.seconds = time.perf_counter() - t0
            self._after_step(plan, logits, out)
            break
        out.finished, self._ended = self._ended, []
        for request in {c.request for c in out.finished}:
            self._forget_if_done(request)
        return out

    def _plan(self, admit: bool) -> list[tuple[Choice, int]]:
        """The batch: (choice, how many of its pending tokens to run), preempting or ending sequences
        where blocks run short."""
        plan = _Plan(self.pool)
        budget = self.max_step_tokens
        # decode tokens first (the oldest sequences first), then prompt chunks of running sequences
        for decoding in (True, False):
            for choice in list(self._running):
                if budget == 0:
                    break
                if choice.seq is None or choice in plan.tokens or (self._pending(choice) == 1) != decoding:
                    continue  # preempted meanwhile, or not in this pass
                if not self._make_room(choice, plan):
                    continue
                n = self._fit(choice, min(self._pending(choice), budget, self._room(choice.seq)), plan.available())
                plan.add(choice, n)
                budget -= n
        # then new (or preempted) sequences, in order, while the whole of what they must run fits
        while admit and budget > 0 and self._waiting and len(self._running) < self.parallel:
            choice = self._waiting[0]
            seq = self._new_sequence()
            reused = seq.reuse_prefix(choice.tokens)  # (0 with a window)
            pending = len(choice.tokens) - reused
            if self.pool.blocks_needed(seq, pending) > plan.available():
                seq.free()  # its reused blocks stay cached
                if not self._running:  # alone it cannot fit (a restart of a reply as long as the pool)
                    self._end(choice, "length")
                    continue
                break
            self._waiting.popleft()
            if choice.index == 0 and choice.started == 0:
                choice.request.cached_tokens = reused
            self._start(choice, seq)
            plan.add(choice, min(pending, budget, self._room(seq)))
            budget -= plan.tokens[choice]
        return list(plan.tokens.items())

    def _make_room(self, choice: Choice, plan: "_Plan") -> bool:
        """Preempt the newest running sequences until choice can run one more token; False when choice
        itself was preempted (it was the newest) or ended (alone, it can never grow)."""
        while self.pool.blocks_needed(choice.seq, 1) > plan.available():
            victim = self._running[-1]
            plan.remove(victim)
            self._evict(victim)
            if victim is choice:
                return False
        return True

    def _evict(self, victim: Choice) -> None:
        """Preempt victim, or end it ("length") when it is the only sequence running: then no other
        sequence holds blocks it could get, and it can never grow."""
        if self._running == [victim]:
            self._end(victim, "length")
        else:
            self._preempt(victim)

    def _fit(self, choice: Choice, n: int, available: int) -> int:
        """The most tokens, at most n and at least 1, choice can run with `available` blocks."""
        low, high = 1, n
        while low < high:
            mid = (low + high + 1) // 2
            if self.pool.blocks_needed(choice.seq, mid) <= available:
                low = mid
            else:
                high = mid - 1
        return low

    def _new_sequence(self) -> Any:
        return self.pool.sequence() if self.window is None else self.pool.sequence(window=self.window, sinks=self.sinks)

    def _room(self, seq: Any) -> int:
        """Tokens seq can take in one step: a window's up to its end (it moves a block at a time)."""
        return seq.room if self.window is not None else self.max_step_tokens

    @staticmethod
    def _pending(choice: Choice) -> int:
        return len(choice.tokens) - choice.seq.len

    def _after_step(self, plan: list[tuple[Choice, int]], logits: np.ndarray, out: StepOutput) -> None:
        """Sample every sequence whose tokens all ran; fork n > 1 requests after their prompt."""
        for row, (choice, n) in enumerate(plan):
            out.batch.append((choice, n, n == 1 and choice.generated > 0 and choice.seq.len == len(choice.tokens)))
            if choice.seq.len < len(choice.tokens):
                continue  # a chunk of its prompt (or of its restart): no token yet
            request = choice.request
            siblings = [choice]
            if choice.index == 0 and len(request.choices) < request.n:
                siblings += self._fork(choice)
            for sibling in siblings:
                self._sample(sibling, logits[row], out)

    def _fork(self, first: Choice) -> list[Choice]:
        """The other choices of first's request, just after its prompt ran: forked from it while there
        are free running slots, the rest waiting at the front of the queue (holding no blocks)."""
        request = first.request
        children = [Choice(request, i, first.tokens) for i in range(len(request.choices), request.n)]
        request.choices += children
        queued = []
        for child in children:
            if len(self._running) < self.parallel:
                self._start(child, first.seq.fork())
            else:
                queued.append(child)
        self._waiting.extendleft(reversed(queued))
        return children

    def _sample(self, choice: Choice, logits: np.ndarray, out: StepOutput) -> None:
        """Sample choice's next token: a stop token ends it, else it is appended (and reported)."""
        request = choice.request
        token = choice.sampler.sample(logits)
        if token in request.stop_ids:
            self._end(choice, "stop")
            return
        choice.tokens.append(token)
        choice.generated += 1
        out.sampled.append((choice, token))
        fed = len(choice.tokens) - 1  # what the pool holds once it ran (or would, for a queued fork)
        past_context = fed >= self.context and (self.window is None or request.max_tokens is None)
        if choice.generated == request.max_tokens or past_context:  # a window runs on as far as max_tokens asks
            self._end(choice, "length")

    # -- moving sequences ------------------------------------------------------------------------

    def _start(self, choice: Choice, seq: Any) -> None:
        choice.seq = seq
        choice.started = next(self._clock)
        self._running.append(choice)

    def _preempt(self, choice: Choice) -> None:
        """Free choice's blocks and put it at the front of the waiting queue (it restarts from its tokens)."""
        self._release(choice)
        self._waiting.appendleft(choice)
        self.preemptions += 1

    def _release(self, choice: Choice) -> None:
        if choice.seq is not None:
            choice.seq.free()
            choice.seq = None
            self._running.remove(choice)

    def _end(self, choice: Choice, reason: str, report: bool = True) -> None:
        """choice ended: free its blocks, take it off the queues; report: in the next step's output."""
        choice.finish_reason = reason
        if report:
            self._ended.append(choice)
        self._release(choice)
        try:
            self._waiting.remove(choice)
        except ValueError:
            pass

    def _forget_if_done(self, request: ScheduledRequest) -> None:
        if request.done and request in self._requests:
            self._requests.remove(request)


class _Plan:
    """A batch being planned: tokens per sequence, and the blocks each needs for them."""

    def __init__(self, pool: Any):
        self.pool = pool
        self.tokens: dict[Choice, int] = {}
        self.needs: dict[Choice, int] = {}

    def add(self, choice: Choice, n: int) -> None:
        self.tokens[choice] = n
        self.needs[choice] = self.pool.blocks_needed(choice.seq, n)

    def remove(self, choice: Choice) -> None:
        self.tokens.pop(choice, None)
        self.needs.pop(choice, None)

    def available(self) -> int:
        """Blocks free or reclaimable (cached) once the planned work has taken its own."""
        stats = self.pool.stats()
        return stats.free + stats.cached - sum(self.needs.values())
