"""The long-poll engine: one polling loop per task, shared by every client waiting on it.

A waiter is a plain Future plus one timer: thousands of them cost little. The loop for a task
reads the upstream at once and then every `interval`, settles every waiter when the task
finishes, and stops as soon as its last waiter has gone (answered, timed out or disconnected).
Transient upstream faults are logged and retried at the next tick; only a definite answer
(completed, failed, unknown task) ends a wait early.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

from zimage_tornado.cache import ResultCache
from zimage_tornado.domain import Task
from zimage_tornado.upstream import TaskNotFound, UpstreamError, ZImageClient

log = logging.getLogger("zimage_tornado.watcher")
T = TypeVar("T")

# Outcome states besides the task's own "completed" and "failed".
NOT_FOUND = "not_found"
TIMEOUT = "timeout"
UPSTREAM_ERROR = "upstream_error"  # a definite, non-transient refusal while polling
INTERRUPTED = "interrupted"  # the engine is shutting down
RUNNING = "running"  # still running, for a caller that asked not to wait


class TooManyWaiters(Exception):
    pass


@dataclass(frozen=True)
class Outcome:
    state: str
    uuid: str
    task: Task | None = None  # the last state seen
    error: UpstreamError | None = None  # the last upstream failure, if the last read failed
    waited: float = 0.0  # the budget this waiter had (each waiter its own)


class _Poll:
    __slots__ = ("uuid", "waiters", "task", "task_at", "error", "wakeup", "runner", "tick")

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.waiters: dict[asyncio.Future[Outcome], float] = {}  # each waiter's budget
        self.task: Task | None = None
        self.task_at = 0.0
        self.error: UpstreamError | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.runner: asyncio.Task[None] | None = None
        self.tick: asyncio.Future[Task | None] | None = None  # resolved after the next read


class TaskWatcher:
    def __init__(self, client: ZImageClient, *, interval: float, budget: float, max_waiters: int,
                 cache: ResultCache[Task], on_final: Callable[[Task], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.interval = interval
        self.budget = budget  # a wait's default length (Settings.wait_budget)
        self.max_waiters = max_waiters
        self.cache = cache
        self.on_final = on_final  # told once a read sees a task finished (the usage record)
        self.waiting = 0
        self.counters: Counter[str] = Counter()
        self._polls: dict[str, _Poll] = {}
        self._reads: dict[str, asyncio.Future[Task]] = {}
        self.closed = False

    @property
    def active_polls(self) -> int:
        return len(self._polls)

    @property
    def idle(self) -> bool:
        """Nobody waits, no loop runs, no read is in flight."""
        return not (self.waiting or self._polls or self._reads)

    # -- reading ---------------------------------------------------------------------------

    async def read(self, uuid: str) -> Task:
        """The task now: from the cache when finished, else one upstream read shared by all
        callers asking at the same moment."""
        cached = self.cache.get(uuid)
        if cached is not None:
            self.counters["cache_hits"] += 1
            return cached
        pending = self._reads.get(uuid)
        if pending is None:
            pending = self._shared_task(self._read_upstream(uuid))
            self._reads[uuid] = pending
            pending.add_done_callback(functools.partial(self._read_done, uuid))
        else:
            self.counters["coalesced_reads"] += 1
        # shield: one caller leaving must not cancel the read the others are waiting for
        return await asyncio.shield(pending)

    def _read_done(self, uuid: str, future: asyncio.Future[Task]) -> None:
        self._reads.pop(uuid, None)
        if not future.cancelled():
            future.exception()  # retrieved here so an unawaited failure is not reported as lost

    async def _read_upstream(self, uuid: str) -> Task:
        self.counters["upstream_reads"] += 1
        task = await self.client.get_task(uuid)
        if task.is_final:
            self.cache.put(uuid, task)
            if self.on_final is not None:
                await self.on_final(task)
        return task

    async def peek(self, uuid: str) -> Task:
        """The current state without waiting; reuses a running loop's read from this interval."""
        poll = self._polls.get(uuid)
        loop = asyncio.get_running_loop()
        if poll is not None and poll.task is not None and loop.time() - poll.task_at < self.interval:
            return poll.task
        return await self.read(uuid)

    # -- waiting ---------------------------------------------------------------------------

    def wait(self, uuid: str, budget: float | None = None) -> asyncio.Future[Outcome]:
        """A future for the task's outcome within `budget` seconds. Cancel it to leave."""
        loop = asyncio.get_running_loop()
        budget = self.budget if budget is None else budget
        future: asyncio.Future[Outcome] = loop.create_future()
        cached = self.cache.get(uuid)
        if cached is not None:
            self.counters["cache_hits"] += 1
            future.set_result(Outcome(cached.status, uuid, cached, None, budget))
            return future
        if self.closed:  # shutting down: no new loops
            future.set_result(Outcome(INTERRUPTED, uuid, None, None, budget))
            return future
        if self.waiting >= self.max_waiters:
            self.counters["waiters_refused"] += 1
            raise TooManyWaiters()
        poll = self._polls.get(uuid)
        if poll is None:
            poll = self._polls[uuid] = _Poll(uuid)
            poll.runner = self._shared_task(self._run(poll))
        else:
            self.counters["coalesced_waiters"] += 1
        timer = loop.call_later(budget, self._expire, poll, future, budget)
        poll.waiters[future] = budget
        self.waiting += 1
        future.add_done_callback(functools.partial(self._left, poll, timer))
        return future

    def next_tick(self, uuid: str) -> asyncio.Future[Task | None]:
        """Resolves with the latest state after the task's next status read (streams report
        progress with it); at once, with None, when no loop runs for the task."""
        poll = self._polls.get(uuid)
        if poll is None:
            done: asyncio.Future[Task | None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if poll.tick is None:
            poll.tick = asyncio.get_running_loop().create_future()
        return poll.tick

    @staticmethod
    def _ticked(poll: _Poll) -> None:
        if poll.tick is not None:
            if not poll.tick.done():
                poll.tick.set_result(poll.task)
            poll.tick = None

    @staticmethod
    def _shared_task(coroutine: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        # Serves many requests: start from an empty context, not the first request's (its
        # X-Request-ID would otherwise tag every log line and upstream call of the task).
        return asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())

    def _expire(self, poll: _Poll, future: asyncio.Future[Outcome], budget: float) -> None:
        if not future.done():
            future.set_result(Outcome(TIMEOUT, poll.uuid, poll.task, poll.error, budget))

    def _left(self, poll: _Poll, timer: asyncio.TimerHandle, future: asyncio.Future[Outcome]) -> None:
        timer.cancel()
        poll.waiters.pop(future, None)
        self.waiting -= 1
        if not poll.waiters and poll.wakeup is not None and not poll.wakeup.done():
            poll.wakeup.set_result(None)  # the loop stops now instead of at its next tick

    def _settle(self, poll: _Poll, state: str, error: UpstreamError | None = None) -> None:
        for future, budget in list(poll.waiters.items()):
            if not future.done():
                future.set_result(Outcome(state, poll.uuid, poll.task, error, budget))

    async def _run(self, poll: _Poll) -> None:
        loop = asyncio.get_running_loop()
        self.counters["polls_started"] += 1
        try:
            while poll.waiters:
                # Counted from the answer, not from the request: however late a read reached the
                # upstream, the next one comes at least one interval later (it may rate-limit).
                delay = self.interval
                try:
                    task = await self.read(poll.uuid)
                except TaskNotFound as e:
                    self._settle(poll, NOT_FOUND, e)
                    return
                except UpstreamError as e:
                    poll.error = e
                    self.counters["upstream_errors"] += 1
                    if not e.transient:
                        log.warning("task %s: the upstream refused a status read: %s", poll.uuid, e)
                        self._settle(poll, UPSTREAM_ERROR, e)
                        return
                    delay = max(delay, e.retry_after or 0)
                    log.warning("task %s: status read failed (%s: %s); retrying in %.2fs",
                                poll.uuid, e.code, e, delay)
                else:
                    if poll.task is None or poll.task.status != task.status:
                        log.info("task %s is %s", poll.uuid, task.status)
                    poll.task, poll.task_at, poll.error = task, loop.time(), None
                    if task.is_final:
                        self._settle(poll, task.status)
                        return
                self._ticked(poll)
                if not poll.waiters:
                    break
                poll.wakeup = loop.create_future()
                await asyncio.wait([poll.wakeup], timeout=delay)
        except asyncio.CancelledError:
            self._settle(poll, INTERRUPTED, poll.error)
            raise
        except Exception:  # a bug here must not leave waiters hanging until their budget ends
            log.exception("task %s: polling loop crashed", poll.uuid)
            self._settle(poll, UPSTREAM_ERROR, UpstreamError("Internal error while polling the task"))
        finally:
            self._polls.pop(poll.uuid, None)
            self._ticked(poll)

    async def close(self) -> None:
        """Ends every loop; their waiters get an INTERRUPTED outcome with the last state seen,
        and so does every later wait()."""
        self.closed = True
        pending: list[asyncio.Future[Any]] = [poll.runner for poll in self._polls.values() if poll.runner]
        pending += self._reads.values()
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
