"""The long-poll engine: one polling loop per task, shared by every client waiting on it.

A waiter is a plain Future plus one timer: thousands of them cost little. The loop for a task
reads the upstream at once and then every `interval`, settles every waiter when the task
finishes, and stops as soon as its last waiter has gone (answered, timed out or disconnected).
Transient upstream faults are logged and retried at the next tick; only a definite answer
(completed, failed, unknown task) ends a wait early.

Follow-up: a task the gateway submitted is followed by the same loop even when nobody waits on
it (`follow_up`), so that its record learns how it ended: every interval for the first wait
budget, then every `follow_interval`, until it ends or `follow_budget` has passed since its
submit, when `on_expired` is told. Waiters joining a followed task share its loop as usual.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
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
# A follower asks for a task's lease once it has heard no state for this many intervals: its
# holder publishes one each interval, so silence means it is gone (or slow).
LEASE_PATIENCE = 1.25


class TooManyWaiters(Exception):
    pass





def gcra(tat: float, now: float, rate: float, hold: float) -> tuple[float, float]:
    """The generic cell rate algorithm: (the new theoretical arrival time, the wait for this turn)."""
    step = 1.0 / rate
    if hold > 0:  # no read for `hold` seconds, burst allowance included
        return max(tat, now + hold + 1.0 - step), 0.0
    tat = max(tat, now)
    wait = max(0.0, tat - (1.0 - step) - now)  # up to one second's reads at once, then spaced
    return tat + step, wait


class Coordination:
    """How the instances of a fleet share the polling of a task. This one is an instance alone:
    it always reads the upstream and shares nothing. store/redis.py has the fleet's: a lease
    decides which instance reads a task, the others hear each state it publishes."""

    async def lease(self, uuid: str) -> bool:
        """True when this instance should read the task's status now."""
        return True

    async def publish(self, task: Task) -> None:
        """A state this instance read, for the others (and the shared cache, when final)."""

    async def shared(self, uuid: str) -> Task | None:
        """The task's finished state, if any instance has seen it."""
        return None

    async def recent(self, uuid: str, max_age: float) -> Task | None:
        """The task's state as another instance read it within `max_age` seconds, if any."""
        return None

    _tat = 0.0  # pace(): when the next read is due in the instance's own bucket

    async def pace(self, rate: float, hold: float = 0.0, only_free: bool = False) -> float | None:
        """Takes a turn in the bucket of upstream status reads (`rate` a second, with a burst of one
        second's worth) and says how long to wait for it; `hold` instead makes every read wait that
        long (the upstream asked for it: 429 with Retry-After). `only_free`: take a turn only if
        one is free now, else None (a background read gives way). A fleet shares one bucket."""
        now = time.time()
        tat, wait = gcra(self._tat, now, rate, hold)
        if only_free and wait > 0:
            return None
        self._tat = tat
        return wait

    async def follow(self, uuid: str, heard: Callable[[Task], None]) -> None:
        """Call `heard` with each state another instance publishes, until unfollow()."""

    async def unfollow(self, uuid: str) -> None:
        """Stop following the task."""

    async def close(self) -> None:
        """Let go of what it holds (connections)."""


@dataclass(frozen=True)
class Outcome:
    state: str
    uuid: str
    task: Task | None = None  # the last state seen
    error: UpstreamError | None = None  # the last upstream failure, if the last read failed
    waited: float = 0.0  # the budget this waiter had (each waiter its own)


MAX_FOLLOWED = 100_000  # tasks followed with nobody waiting: past this, new ones are not followed


class _Poll:
    __slots__ = ("uuid", "waiters", "task", "task_at", "error", "wakeup", "runner", "tick", "leased", "heard_at",
                 "lease_errors", "read_at", "not_before", "follow_from", "follow_until", "final", "deferrals")

    def __init__(self, uuid: str) -> None:
        self.uuid = uuid
        self.waiters: dict[asyncio.Future[Outcome], float] = {}  # each waiter's budget
        self.task: Task | None = None
        self.task_at = 0.0
        self.error: UpstreamError | None = None
        self.wakeup: asyncio.Future[None] | None = None
        self.runner: asyncio.Task[None] | None = None
        self.tick: asyncio.Future[Task | None] | None = None  # resolved after the next read
        self.leased = False  # this instance read the task at its last tick (it holds the fleet's lease)
        self.heard_at = 0.0  # when another instance's state of the task last arrived
        self.lease_errors = 0  # lease attempts in a row that failed (Redis down, or too slow)
        self.read_at = float("-inf")  # when the last read (or lease attempt) answered: the next is an interval on
        self.not_before = 0.0  # the upstream asked us to wait (Retry-After)
        self.follow_from = 0.0  # followed: when the task was submitted (loop time)
        self.follow_until: float | None = None  # followed: when to give up on it
        self.final = False  # another instance told us it ended
        self.deferrals = 0  # background reads in a row that gave way to others


class TaskWatcher:
    def __init__(self, client: ZImageClient, *, interval: float, budget: float, max_waiters: int,
                 cache: ResultCache[Task, str], on_final: Callable[[Task], Awaitable[None]] | None = None,
                 coordination: Coordination | None = None, follow_budget: float = 0.0,
                 follow_interval: float = 60.0, on_expired: Callable[[str], Awaitable[None]] | None = None,
                 reads_per_second: float = 0.0, on_progress: Callable[[Task], None] | None = None) -> None:
        self.client = client
        self.on_progress = on_progress  # told of each running state this instance read (webhooks)
        self.interval = interval
        self.budget = budget  # a wait's default length (Settings.wait_budget)
        self.follow_budget = follow_budget  # 0: tasks nobody waits on are not followed
        self.follow_interval = max(follow_interval, interval)
        self.on_expired = on_expired  # told when a followed task did not end within follow_budget
        self.reads_per_second = reads_per_second  # upstream_reads_per_second; 0: unpaced
        self.max_waiters = max_waiters
        self.cache = cache
        self.on_final = on_final  # told once a read sees a task finished (the usage record)
        self.coordination = coordination or Coordination()
        self.waiting = 0
        self.followed = 0  # loops of followed tasks (waited on or not)
        self.counters: Counter[str] = Counter()
        self._polls: dict[str, _Poll] = {}
        self._reads: dict[str, asyncio.Future[Task]] = {}
        # Every state read in the last interval, whoever asked: one upstream read per task per interval.
        self._fresh: ResultCache[Task, str] = ResultCache(max(cache.max_entries, 1000), interval)
        self.closed = False

    @property
    def active_polls(self) -> int:
        return len(self._polls)


    @property
    def idle(self) -> bool:
        """Nobody waits, no loop runs, no read is in flight."""
        return not (self.waiting or self._polls or self._reads)

    # -- reading ---------------------------------------------------------------------------

    async def read(self, uuid: str, fresh_ok: bool = True, turn_taken: bool = False) -> Task:
        """The task now: from the cache when finished, else one upstream read shared by all
        callers asking at the same moment."""
        cached = self.cache.get(uuid) or (self._fresh.get(uuid) if fresh_ok else None)
        if cached is not None:
            self.counters["cache_hits"] += 1
            return cached
        pending = self._reads.get(uuid)
        if pending is None:
            pending = self._shared_task(self._read_upstream(uuid, fresh_ok, turn_taken))
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

    async def _read_upstream(self, uuid: str, fresh_ok: bool, turn_taken: bool) -> Task:
        shared = await self._shared(uuid, fresh_ok)  # finished, or read lately, by another instance of the fleet
        if shared is not None:
            self.counters["shared_cache_hits"] += 1
            (self.cache if shared.is_final else self._fresh).put(uuid, shared)
            return shared
        if not turn_taken:
            await self._turn()
        self.counters["upstream_reads"] += 1
        try:
            task = await self.client.get_task(uuid)
        except UpstreamError as e:
            if e.upstream_status == 429:  # slow down for everyone, as long as it asked
                await self._turn(hold=e.retry_after or self.interval)
            raise
        self._fresh.put(uuid, task)
        if task.is_final:
            self.cache.put(uuid, task)
            if self.on_final is not None:
                await self.on_final(task)
        elif self.on_progress is not None:
            self.on_progress(task)
        try:
            await self.coordination.publish(task)
        except Exception as e:  # noqa: BLE001 - the others poll for themselves when they hear nothing
            log.warning("task %s: could not publish its state: %s", uuid, e)
        return task

    async def _turn(self, hold: float = 0.0, background: bool = False) -> bool:
        """Waits for this read's turn in the upstream_reads_per_second bucket (reads are spread,
        never refused). A background read (a followed task nobody waits on) takes a turn only when
        one is free, so that it never delays a read someone waits for: False when it gave way."""
        if not self.reads_per_second:
            return True
        try:
            wait = await self.coordination.pace(self.reads_per_second, hold, background)
        except Exception as e:  # noqa: BLE001 - the fleet's bucket is unavailable: pace alone
            log.warning("the shared read bucket is unavailable (%s); pacing this instance alone", e)
            wait = await Coordination.pace(self.coordination, self.reads_per_second, hold, background)
        if wait is None:
            self.counters["reads_deferred"] += 1
            return False
        if wait > 0:
            self.counters["reads_paced"] += 1
            await asyncio.sleep(wait)
        return True

    async def _shared(self, uuid: str, fresh_ok: bool) -> Task | None:
        try:
            shared = await self.coordination.shared(uuid)
            if shared is not None and shared.is_final:
                return shared
            return await self.coordination.recent(uuid, self.interval) if fresh_ok else None
        except Exception as e:  # noqa: BLE001 - without the shared cache, ask the upstream
            log.warning("task %s: the shared cache is unavailable: %s", uuid, e)
            return None

    async def _may_read(self, poll: _Poll) -> bool:
        try:
            leased = await self.coordination.lease(poll.uuid)
        except Exception as e:  # noqa: BLE001 - the fleet's lease is unavailable
            self.counters["lease_errors"] += 1
            poll.lease_errors += 1
            # Its holder reads on; a follower once a second attempt fails too: one slow answer
            # (a busy moment) must not make every instance read, a Redis that is down must.
            if poll.leased or poll.lease_errors >= 2:
                log.warning("task %s: no lease (%s); reading the upstream itself", poll.uuid, e)
                return True
            return False
        poll.lease_errors = 0
        return leased

    def _heard(self, poll: _Poll, task: Task) -> None:
        """Another instance published the task's state: answer from it as from our own read."""
        if self._polls.get(poll.uuid) is not poll:
            return
        self.counters["states_heard"] += 1
        now = asyncio.get_running_loop().time()
        poll.task, poll.task_at, poll.heard_at, poll.error = task, now, now, None
        if task.is_final:
            self.cache.put(poll.uuid, task)
            poll.final = True
            self._settle(poll, task.status)
            self._wake(poll)  # a followed task's loop stops now, waiters or not
        else:
            self._ticked(poll)

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
            if not poll.waiters:
                if poll.task is None and poll.error is None:
                    poll.read_at = float("-inf")  # never read since its submit: the first waiter's check is now
                if poll.deferrals:
                    poll.not_before, poll.deferrals = 0.0, 0  # no longer in the background: no backing off
                self._wake(poll)  # a followed task may be read a minute apart: a waiter wants every interval
        timer = loop.call_later(budget, self._expire, poll, future, budget)
        poll.waiters[future] = budget
        self.waiting += 1
        future.add_done_callback(functools.partial(self._left, poll, timer))
        return future

    def follow_up(self, uuid: str, age: float = 0.0) -> None:
        """Follow a submitted task (`age` seconds ago) until it ends or follow_budget passes,
        whether anyone waits on it or not. Nothing to do when it is known to have ended."""
        if self.closed or self.follow_budget <= 0 or self.cache.get(uuid) is not None:
            return
        poll = self._polls.get(uuid)
        if poll is None:
            if self.followed >= MAX_FOLLOWED:
                self.counters["follow_refused"] += 1
                log.warning("task %s: %d tasks are followed already; not following it", uuid, MAX_FOLLOWED)
                return
            poll = self._polls[uuid] = _Poll(uuid)
            # The submit's answer was its state a moment ago: the first read is an interval on.
            poll.read_at = asyncio.get_running_loop().time() - age
            poll.runner = self._shared_task(self._run(poll))
        now = asyncio.get_running_loop().time()
        if poll.follow_until is None:
            self.followed += 1
        poll.follow_from = now - age
        poll.follow_until = now - age + self.follow_budget

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
        if not poll.waiters:
            self._wake(poll)  # the loop stops now (or goes on following) instead of at its next tick

    @staticmethod
    def _wake(poll: _Poll) -> None:
        if poll.wakeup is not None and not poll.wakeup.done():
            poll.wakeup.set_result(None)

    def _wanted(self, poll: _Poll, now: float) -> bool:
        """The loop goes on while someone waits, or while the task is followed and within its budget."""
        return not poll.final and bool(poll.waiters or (poll.follow_until is not None and now < poll.follow_until))

    async def _pause(self, poll: _Poll) -> None:
        """Until the next read is due: an interval after the last answer while anyone waits or the
        task is young, follow_interval after it once it is old; woken early by waiters coming or
        going, and at follow_until to expire on time."""
        loop = asyncio.get_running_loop()
        while self._wanted(poll, loop.time()):
            young = loop.time() - poll.follow_from < self.budget
            delay = self.interval if poll.waiters or poll.follow_until is None or young else self.follow_interval
            due = max(poll.read_at + delay, poll.not_before)
            if not poll.waiters and poll.follow_until is not None:
                due = min(due, poll.follow_until)
            remaining = due - loop.time()
            if remaining <= 0:
                return
            poll.wakeup = loop.create_future()
            await asyncio.wait([poll.wakeup], timeout=remaining)

    def _settle(self, poll: _Poll, state: str, error: UpstreamError | None = None) -> None:
        for future, budget in list(poll.waiters.items()):
            if not future.done():
                future.set_result(Outcome(state, poll.uuid, poll.task, error, budget))

    async def _run(self, poll: _Poll) -> None:
        loop = asyncio.get_running_loop()
        self.counters["polls_started"] += 1
        following = expired = False
        try:
            try:
                await self.coordination.follow(poll.uuid, functools.partial(self._heard, poll))
                following = True
            except Exception as e:  # noqa: BLE001 - unheard states are read by ourselves instead
                log.warning("task %s: cannot follow its shared state: %s", poll.uuid, e)
            await self._pause(poll)  # a followed task was read by its submit a moment ago
            while self._wanted(poll, loop.time()):
                # While another instance's states keep coming, it holds the lease: asking for it
                # would only cost Redis a call per instance per task per interval.
                silent = loop.time() - poll.heard_at > LEASE_PATIENCE * self.interval
                poll.leased = (poll.leased or silent) and await self._may_read(poll)
                if not poll.leased:  # another instance reads it: we hear its states
                    self.counters["reads_left_to_others"] += 1
                else:
                    background = not poll.waiters
                    if background and not await self._turn(background=True):
                        # No free turn: reads someone waits for go first. Back off, up to
                        # follow_interval, so that a backlog of followed tasks costs few wake-ups.
                        poll.deferrals += 1
                        poll.not_before = loop.time() + min(self.follow_interval,
                                                            self.interval * 2 ** min(poll.deferrals, 10))
                        poll.read_at = loop.time()
                        await self._pause(poll)
                        continue
                    poll.deferrals = 0
                    try:
                        # Its turn to ask the upstream (taken above when nobody waits on it).
                        task = await self.read(poll.uuid, fresh_ok=False, turn_taken=background)
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
                        # Counted from the answer, not from the request: however late a read reached
                        # the upstream, the next one comes at least one interval later.
                        poll.not_before = loop.time() + (e.retry_after or 0)
                        log.warning("task %s: status read failed (%s: %s); retrying in %.2fs",
                                    poll.uuid, e.code, e, max(self.interval, e.retry_after or 0))
                    else:
                        if poll.task is None or poll.task.status != task.status:
                            log.info("task %s is %s", poll.uuid, task.status)
                        poll.task, poll.task_at, poll.error = task, loop.time(), None
                        if task.is_final:
                            self._settle(poll, task.status)
                            return
                    self._ticked(poll)
                poll.read_at = loop.time()
                await self._pause(poll)
            expired = not poll.final and poll.follow_until is not None and loop.time() >= poll.follow_until
        except asyncio.CancelledError:
            self._settle(poll, INTERRUPTED, poll.error)
            raise
        except Exception:  # a bug here must not leave waiters hanging until their budget ends
            log.exception("task %s: polling loop crashed", poll.uuid)
            self._settle(poll, UPSTREAM_ERROR, UpstreamError("Internal error while polling the task"))
        finally:
            if self._polls.get(poll.uuid) is poll:
                del self._polls[poll.uuid]
            if poll.follow_until is not None:
                self.followed -= 1
            self._ticked(poll)
            if following:
                await self._unfollow(poll.uuid)
        if expired:
            self.counters["follow_expired"] += 1
            log.info("task %s did not end within follow_budget; its record says expired", poll.uuid)
            if self.on_expired is not None:
                await self.on_expired(poll.uuid)

    async def _unfollow(self, uuid: str) -> None:
        try:
            await self.coordination.unfollow(uuid)
        except Exception as e:  # noqa: BLE001 - a dropped subscription costs a little traffic only
            log.warning("task %s: could not stop following it: %s", uuid, e)

    async def close(self) -> None:
        """Ends every loop; their waiters get an INTERRUPTED outcome with the last state seen,
        and so does every later wait()."""
        self.closed = True
        pending: list[asyncio.Future[Any]] = [poll.runner for poll in self._polls.values() if poll.runner]
        pending += self._reads.values()
        for future in pending:
            future.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
