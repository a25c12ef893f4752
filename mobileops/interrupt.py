"""Ctrl-C that lets the current step finish: the first SIGINT asks to stop, the second interrupts at once."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TextIO


class GracefulInterrupt:
    """Context manager deferring the first SIGINT (Ctrl-C) until the caller polls :meth:`requested`.

    Inside the ``with`` block the first SIGINT only sets a flag (and prints one line saying so);
    the loop finishes its step, sees :meth:`requested`, saves and stops. A second SIGINT restores
    the previous handler and raises :class:`KeyboardInterrupt` at once, as plain Python would. The
    previous handler is restored on exit. Outside the main thread (where Python allows no signal
    handler) it does nothing and :meth:`requested` stays False.

    Args:
        message: printed on ``stream`` at the first SIGINT.
        stream: where to print it (default stderr).
    """

    def __init__(self, message: str = "Ctrl-C: stopping after this step (press Ctrl-C again to abort at once)",
                 stream: TextIO | None = None):
        self.message = message
        self.stream = stream
        self._requested = False
        self._previous = None
        self._installed = False

    def requested(self) -> bool:
        """Whether a SIGINT arrived since the block was entered."""
        return self._requested

    def _handle(self, signum, frame):
        if self._requested:
            self._restore()
            raise KeyboardInterrupt
        self._requested = True
        stream = self.stream if self.stream is not None else sys.stderr
        print(f"\n{self.message}", file=stream, flush=True)

    def _restore(self):
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGINT, previous)
            self._installed = False

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        self._restore()


__all__ = ["GracefulInterrupt"]
