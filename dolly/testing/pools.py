"""Clones made ahead: a small pool per fixture and pytest process, so that a test takes a clone
that is already running and gives it back to be removed, while the pool's threads make the next
one and remove the used ones, during the test rather than before and after it.

Every clone is made by the :class:`~dolly.testing.services.Plugin`'s own restore (the run's
labels, recorded in the run's state folder as the engine creates it), so a pool's clones, spare or
used, are removed with the run at its end, or by the reaper when the run was killed.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable, Deque, List, Optional

from docker.models.containers import Container


class ClonePool:
    """Up to ``ahead`` spare clones of one checkpoint, kept ready by a thread; used clones are
    removed by another.

    ``make`` restores a clone; ``remove`` removes one (each is called from its own thread only,
    and ``remove`` also from :meth:`close`). A test that finds no spare waits for the one being
    made.
    """

    def __init__(self, make: Callable[[], Container], remove: Callable[[Container], None], *, ahead: int) -> None:
        self._make, self._remove, self.ahead = make, remove, ahead
        self._spares: Deque[Container] = deque()
        self._used: List[Container] = []
        self._error: Optional[BaseException] = None
        self._closed = False
        self._cond = threading.Condition()
        # One thread makes spares, another removes used clones: a removal never delays a spare.
        self._threads = [threading.Thread(target=self._making, name="dolly-clone-pool", daemon=True),
                         threading.Thread(target=self._removing, name="dolly-clone-pool-rm", daemon=True)]
        for thread in self._threads:
            thread.start()

    def take(self) -> Container:
        """A spare clone, waiting for the one being made when there is none.

        Raises:
            Whatever making a clone raised (the pool then makes no more).
        """
        with self._cond:
            while not self._spares and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            clone = self._spares.popleft()
            self._cond.notify_all()
            return clone

    def give_back(self, clone: Container) -> None:
        """A used clone, removed by the pool's thread once the spares are made."""
        with self._cond:
            self._used.append(clone)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop making clones, and remove the spares and the used ones (after the one being made)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        for clone in [*self._spares, *self._used]:
            self._remove(clone)
        self._spares.clear()
        self._used.clear()

    def _making(self) -> None:
        while True:
            with self._cond:
                while not self._closed and self._error is None and len(self._spares) >= self.ahead:
                    self._cond.wait()
                if self._closed or self._error is not None:
                    return
            try:
                clone = self._make()
            except BaseException as e:  # handed to the test that takes the next clone
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._spares.append(clone)
                self._cond.notify_all()

    def _removing(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._used:
                    self._cond.wait()
                if self._closed:
                    return  # close() removes what is left
                used = self._used.pop()
            self._remove(used)
