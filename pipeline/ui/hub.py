"""Updates to every open browser, each through a bounded queue of its own.

The follower threads publish; each browser's event stream (a coroutine on the server's loop)
takes what is waiting. A browser that does not keep up (a slow link, a tab in the background)
loses its oldest updates, counted and told to it with the next ones (the page then reloads what
it shows), and never holds up the others or the followers: publishing only appends to deques.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass

from pipeline.ui.state import Update


@dataclass(frozen=True, kw_only=True)
class Batch:
    """What a browser gets at once: the updates waiting, how many it lost since the last batch,
    and whether the hub closed (the server stops: end the stream)."""

    updates: tuple[Update, ...]
    lost: int
    closed: bool


class Subscription:
    """One browser's queue; ``get`` from the loop it was made on, ``put`` from any thread."""

    def __init__(self, *, loop: asyncio.AbstractEventLoop, size: int) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self._loop = loop
        self._size = size
        self._queue: deque[Update] = deque()
        self._lock = threading.Lock()
        self._event = asyncio.Event()
        self._wake_pending = False
        self._lost = 0
        self.lost_total = 0
        self.closed = False

    def put(self, update: Update) -> int:
        """Queue ``update``; returns how many older updates it pushed out (0 or 1)."""
        with self._lock:
            if self.closed:
                return 0
            dropped = 0
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self._lost += 1
                self.lost_total += 1
                dropped = 1
            self._queue.append(update)
            wake = not self._wake_pending
            self._wake_pending = True
        if wake:
            self._wake()
        return dropped

    def close(self) -> None:
        with self._lock:
            self.closed = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._event.set)
        except RuntimeError:
            # The server's loop has closed: nobody reads this queue any more.
            with self._lock:
                self.closed = True

    async def get(self, timeout_s: float) -> Batch:
        """The waiting updates; an empty batch after ``timeout_s`` without any (time for a
        keep-alive)."""
        # A timeout is no error here: the stream sends a keep-alive.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout_s)
        self._event.clear()
        with self._lock:
            updates, lost = tuple(self._queue), self._lost
            self._queue.clear()
            self._lost = 0
            self._wake_pending = False
            return Batch(updates=updates, lost=lost, closed=self.closed)


class Hub:
    """The set of open event streams."""

    def __init__(self, *, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.queue_size = queue_size
        self._subs: set[Subscription] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.published_total = 0
        self.lost_total = 0

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(loop=loop, size=self.queue_size)
        with self._lock:
            if self._closed:
                sub.closed = True
            else:
                self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subs.discard(sub)
        sub.close()

    def publish(self, updates: list[Update]) -> None:
        with self._lock:
            subs = list(self._subs)
            self.published_total += len(updates)
        for sub in subs:
            for u in updates:
                lost = sub.put(u)
                if lost:
                    with self._lock:
                        self.lost_total += lost
            if sub.closed:
                with self._lock:
                    self._subs.discard(sub)

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._subs)

    def close(self) -> None:
        """End every stream (the server stops); later subscriptions are closed at once."""
        with self._lock:
            self._closed = True
            subs, self._subs = list(self._subs), set()
        for sub in subs:
            sub.close()
