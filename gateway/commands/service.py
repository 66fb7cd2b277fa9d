"""The command channel in one gateway process: frames to local sessions, results in batches,
timers for what falls due, callers waiting for a final status.

The queue (queue.py) decides every status change in Redis; this class only moves work there
and frames out:

- A `command` message on a device's channel names the session it was sent to: the process
  holding that session (one at most) writes the frame; others drop it.
- Device results are gathered for one batch interval and finished with one script call per
  partition and chunk; each result's future says what it did (the session acks or refuses).
- A process that accepted or sent a command keeps a timer for its due time (its ttl while
  queued, its deadline once sent) when that is near, and asks Redis to act on it then; a
  sweep of every partition's due head, a second late, covers the rest: due times further off,
  and processes that died before their timers fired.
- `wait` lets a caller see a command's final status as it happens: the final state is
  published on the device's channel (`command_done`), which the caller listens to meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from gateway.commands import model
from gateway.commands.model import Command, NewCommand
from gateway.commands.queue import Accepted, CommandQueue, Finished, Listing, ResultIn
from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.scripts import REDIS_ERRORS
from gateway.ticks import run_ticks

log = logging.getLogger("gateway.commands")

SWEEP_LAG = 1.0  # seconds past its due time before the sweep acts (its timer should have)
# a local timer only for what falls due this soon: later ones (a queued command's ttl of an
# hour, say) are the sweep's, so timers stay few however many commands wait
TIMER_HORIZON = 120.0
MAX_TIMERS = 100_000
WAIT_RECHECK = 1.0  # a waiting caller reads the command this often, in case a notice was lost
SUBSCRIBE_WAIT = 2.0


class Frames(Protocol):
    """The device hub, as commands use it: write a frame to a local session."""

    def deliver_frame(self, device_id: str, session_id: str, frame: bytes, kind: str) -> bool: ...


class Channels(Protocol):
    """Counted interest in a device's command channel (broker.DeviceChannels)."""

    def subscribe(self, device_id: str) -> asyncio.Future[None]: ...
    def unsubscribe(self, device_id: str) -> None: ...


@dataclass
class _Result:
    result: ResultIn
    waiter: asyncio.Future[Finished]


@dataclass
class _Waiters:
    futures: list[asyncio.Future[str]] = field(default_factory=list)


class CommandService:
    """One per process. Start `run()` in a task; stop by cancelling."""

    def __init__(
        self, queue: CommandQueue, frames: Frames, settings: Settings, metrics: Metrics
    ) -> None:
        self.queue = queue
        self.frames = frames
        self.settings = settings
        self.metrics = metrics
        self._results: list[_Result] = []
        self._due: set[tuple[str, str]] = set()
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._waiters: dict[str, _Waiters] = {}
        self._wake = asyncio.Event()

    # --- what the broker delivers ------------------------------------------------------
    def on_message(self, device_id: str, data: bytes) -> None:
        """A message of the gateway's own on a device's channel (`command`, `command_done`)."""
        if data.startswith(b'{"type":"command_done"'):
            done = model.read_done(data)
            if done is not None:
                self._notify(*done)
            return
        delivery = model.read_delivery(data)
        if delivery is not None:
            self.frames.deliver_frame(device_id, delivery.session, data, "command")

    # --- results from devices ---------------------------------------------------------
    def submit(self, result: ResultIn) -> asyncio.Future[Finished]:
        """Finish a command with a device's result at the next tick; never awaits Redis."""
        waiter: asyncio.Future[Finished] = asyncio.get_running_loop().create_future()
        self._results.append(_Result(result, waiter))
        self._wake.set()
        return waiter

    # --- sent and accepted commands ---------------------------------------------------
    def sent(self, device_id: str, frames: Sequence[bytes]) -> None:
        """Frames this process sent (a connect's claim): time their deadlines."""
        if not frames:
            return
        for frame in frames:
            read = model.frame_deadline(frame)
            if read is not None:
                self._schedule(device_id, read[0], read[1])
        self.metrics.commands.labels("sent").inc(len(frames))

    async def accept(self, device_id: str, command: NewCommand) -> Accepted:
        """Accept a command; time what falls due next."""
        accepted = await self.queue.create(device_id, command)
        if accepted.created:
            self.metrics.commands.labels(accepted.status).inc()
            self.metrics.command_queue_depth.observe(accepted.pending)
            due = accepted.deadline
            self._schedule(device_id, command.command_id, due or accepted.created_at + command.ttl)
        return accepted

    async def accept_and_wait(
        self, channels: Channels, device_id: str, command: NewCommand, wait: float
    ) -> tuple[Accepted, Command | None]:
        """Accept, then wait up to *wait* seconds for the final status: (what was accepted,
        the final command or None when it was not final in time). The device's channel is
        listened to (*channels*) from before the command exists until the wait ends, so its
        `command_done` cannot pass unseen. Cancelling is safe: the command stays accepted."""
        listening = channels.subscribe(device_id)
        command_id = command.command_id
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUBSCRIBE_WAIT):
                    await listening
            waiter = self._waiter(command_id)
            accepted = await self.accept(device_id, command)
            final = await self._wait_final(device_id, command_id, waiter, wait)
            return accepted, final
        finally:
            self._drop_waiter(command_id)
            channels.unsubscribe(device_id)

    async def cancel(self, device_id: str, command_id: str) -> Command:
        command = await self.queue.cancel(device_id, command_id)
        self.metrics.commands.labels("canceled").inc()
        self._unschedule(device_id, command_id)
        return command

    # --- waiting for a final status ----------------------------------------------------
    def _waiter(self, command_id: str) -> asyncio.Future[str]:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(command_id, _Waiters()).futures.append(future)
        return future

    def _drop_waiter(self, command_id: str) -> None:
        entry = self._waiters.get(command_id)
        if entry is None:
            return
        entry.futures = [f for f in entry.futures if not f.done()]
        if not entry.futures:
            del self._waiters[command_id]

    def _notify(self, command_id: str, status: str) -> None:
        entry = self._waiters.pop(command_id, None)
        if entry is None:
            return
        for future in entry.futures:
            if not future.done():
                future.set_result(status)

    async def _wait_final(
        self, device_id: str, command_id: str, waiter: asyncio.Future[str], wait: float
    ) -> Command | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), min(remaining, WAIT_RECHECK))
            command = await self.queue.get(device_id, command_id)
            if command is None or command.final:
                return command
        command = await self.queue.get(device_id, command_id)
        return command if command is not None and command.final else None

    # --- timers and the sweep -----------------------------------------------------------
    def _schedule(self, device_id: str, command_id: str, due_at: float) -> None:
        key = (device_id, command_id)
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, due_at - time.time())
        if delay > TIMER_HORIZON or len(self._timers) >= MAX_TIMERS:
            return
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _unschedule(self, device_id: str, command_id: str) -> None:
        timer = self._timers.pop((device_id, command_id), None)
        if timer is not None:
            timer.cancel()

    def _fire(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        self._due.add(key)
        self._wake.set()

    async def run(self) -> None:
        """Write results and act on due commands each tick; sweep each sweep interval."""
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._flush_loop())
                group.create_task(self._sweep_loop())
        finally:
            for timer in self._timers.values():
                timer.cancel()
            self._timers.clear()

    async def _flush_loop(self) -> None:
        await run_ticks(self._wake, self.flush, self.settings.batch_interval, "command flush")

    async def flush(self) -> None:
        """Finish the gathered results, then act on what fell due."""
        results, self._results = self._results, []
        due, self._due = self._due, set()
        try:
            await self._finish(results)
        except BaseException:
            self._due |= due
            raise
        await self._expire(sorted(due))

    async def _finish(self, results: list[_Result]) -> None:
        if not results:
            return
        with self.metrics.redis_latency.labels("command_result").time():
            outcomes = await self.queue.finish([r.result for r in results])
        failure: BaseException | None = None
        now = time.time()
        for entry, outcome in zip(results, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
                self._results.append(entry)  # written again at the next tick
                continue
            if outcome.code == 1:
                result = entry.result
                self._unschedule(result.device_id, result.command_id)
                self.metrics.commands.labels(outcome.status).inc()
                if outcome.created_at is not None:
                    self.metrics.command_seconds.labels("created").observe(now - outcome.created_at)
                if outcome.sent_at is not None:
                    self.metrics.command_seconds.labels("sent").observe(now - outcome.sent_at)
            if not entry.waiter.done():
                entry.waiter.set_result(outcome)
        if failure is not None:
            raise failure

    async def _expire(self, due: list[tuple[str, str]]) -> None:
        if not due:
            return
        with self.metrics.redis_latency.labels("command_expire").time():
            outcomes = await self.queue.expire(due)
        retry: list[tuple[str, str]] = []
        for key, outcome in zip(due, outcomes, strict=True):
            if outcome is None:
                retry.append(key)
                continue
            status, due_ms, changed = outcome
            if due_ms > 0:
                self._schedule(*key, due_ms / 1000)
            if changed:
                self.metrics.commands.labels(status).inc()
        if retry:
            self._due.update(retry)
            self._wake.set()

    async def _sweep_loop(self) -> None:
        """Due heads of every partition, each sweep interval: what no live timer took."""
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                due = await self.queue.due_heads(time.time() - SWEEP_LAG)
                self._due.update(due)
                if due:
                    self._wake.set()
                counts = await self.queue.counts()
            except REDIS_ERRORS as exc:
                log.warning("command sweep failed: %s", exc)
                continue
            for status, count in counts.items():
                self.metrics.commands_pending.labels(status).set(count)

    # --- after the pub/sub connection came back -----------------------------------------
    async def resync(self, sessions: Sequence[tuple[str, str]]) -> int:
        """Send live local sessions their pending commands again (messages may have been
        lost while this process could not listen); how many frames went out."""
        sent = 0
        for start in range(0, len(sessions), 500):
            chunk = sessions[start : start + 500]
            frames = await self.queue.claim(chunk)
            for (device_id, session), frames_of in zip(chunk, frames, strict=True):
                for frame in frames_of:
                    if self.frames.deliver_frame(device_id, session, frame, "command"):
                        sent += 1
                self.sent(device_id, frames_of)
        return sent

    # --- reads --------------------------------------------------------------------------
    async def get(self, device_id: str, command_id: str) -> Command:
        return await self.queue.require(device_id, command_id)

    async def page(
        self, device_id: str, listing: Listing, limit: int, cursor: str | None
    ) -> tuple[list[Command], str | None]:
        return await self.queue.page(device_id, listing, limit, cursor)
