"""Ctrl-C always ends a ``pyamalgam`` command with exit code 130 (see docs/robustness.md,
"Interrupts"): :class:`InterruptGuard`, installed by :func:`pyamalgam.cli.main`."""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time

__all__ = ["InterruptGuard"]


class InterruptGuard:
    """Ctrl-C must end a command with 130, even where the KeyboardInterrupt it raises is lost.

    Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives, and some
    places can only swallow it: a function run by ``os.register_at_fork`` (logging's
    ``_releaseLock``, run in the parent after each DataLoader worker is forked, i.e. at the start
    of every epoch with ``num_workers > 0``) or a ``__del__`` prints "Exception ignored in ..."
    and the run goes on to exit 0; a worker that dies of the same Ctrl-C can turn it into
    "DataLoader worker exited unexpectedly" (exit 1). So the handler records every SIGINT, an
    interrupt swallowed as unraisable is raised again just after the code that swallowed it,
    and :func:`main` returns 130 whenever one was recorded, whatever the command did after it.
    """

    #: Delay of a re-raise: the main thread has left the code that swallowed the interrupt by then
    #: (raised at once, it would land in that same code and be swallowed again).
    RERAISE_DELAY_S = 0.05

    def __init__(self):
        self.interrupted = False
        self._pid = os.getpid()  # forked DataLoader workers inherit the handler: they get the default
        self._raising = False
        self._installed = False
        self._lock = threading.Lock()  # a re-raise never lands after stop(); the handler never takes it

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only it may set signal handlers
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._old_hook, sys.unraisablehook = sys.unraisablehook, self._on_unraisable
            self._installed = self._raising = True
        return self

    def stop(self) -> None:
        """From now on record SIGINTs without raising: main() is already finishing with 130."""
        with self._lock:
            self._raising = False

    def __exit__(self, *exc) -> bool:
        if self._installed:
            self.stop()
            time.sleep(0.001)  # a re-raise sent just before stop() is delivered, and handled, in here
            _let_pending_signals_run()
            signal.signal(signal.SIGINT, self._old_handler)
            sys.unraisablehook = self._old_hook
            self._installed = False
        return False

    def _on_sigint(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            raise KeyboardInterrupt  # Python's default, in a forked worker (torch's loop expects it)
        self.interrupted = True
        if self._raising:
            raise KeyboardInterrupt

    def _on_unraisable(self, info) -> None:
        if os.getpid() != self._pid:
            self._old_hook(info)
        elif isinstance(info.exc_value, KeyboardInterrupt):
            self.interrupted = True  # and no "Exception ignored" traceback: we handle it
            timer = threading.Timer(self.RERAISE_DELAY_S, self._reraise)
            timer.daemon = True
            timer.start()
        elif not self.interrupted:
            self._old_hook(info)
        # else: the interrupt's aftermath, not news: e.g. the __del__ of a DataLoader iterator
        # interrupted while it forked its workers fails on the attributes it never set

    def _reraise(self) -> None:
        """In a timer thread: SIGINT again, as if Ctrl-C were pressed once more. Swallowed again
        (by the next fork's hooks), it comes back here, until it reaches main()."""
        with self._lock:
            if not self._raising:
                return
            if hasattr(signal, "pthread_kill"):  # a real signal to the main thread: it also ends a blocking wait
                signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            else:  # pragma: no cover (Windows) - acts at the main thread's next bytecode
                _thread.interrupt_main(signal.SIGINT)


def _let_pending_signals_run() -> None:
    """A Python-level call: the interpreter runs pending signal handlers at function entry."""
