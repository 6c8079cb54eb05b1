"""Where the command line writes, whatever the user's code does, until the process ends.

With ``--json`` (or a ``--format`` export) stdout carries exactly one JSON object. :class:`Streams` keeps a
duplicate of the real stdout that only autobatch holds, points file descriptor 1 (and ``sys.stdout``) at
stderr, and writes the object last: a ``print`` in the user's module or ``forward``, a C library writing to
fd 1, a thread, an ``atexit`` handler, all land on stderr, never in the object.

How long that lasts depends on who called :func:`autobatch.cli.main`:

* **The process** (the ``autobatch`` script, ``python -m autobatch``): from the start of the command until
  the process exits. fd 1 is never given back; the object is written by an ``atexit`` handler registered
  before the user's code runs, so it runs after the user's own (``atexit`` runs the last-registered first,
  and Python joins non-daemon threads before any of them), and the duplicate is closed after it. SIGTERM
  (``timeout``, a CI runner cancelling a job) is the "interrupted" outcome: :class:`Terminated` is raised in
  the main thread, so the probe's ``finally`` blocks restore what it changed, and later SIGTERMs are
  ignored while that runs. A SIGTERM once the command has its outcome (while Python waits for the user's
  threads or runs their ``atexit`` handlers) writes that outcome and exits at once with its code.
* **In-process** (``main(argv)`` from Python, as the tests do): for the command only; everything is
  restored when it returns, and the object is written just before.

Output for people goes through rich consoles that do not wrap lines when piped.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import IO, Any

__all__ = ["Streams", "Terminated", "console"]

PIPED_WIDTH = 160
"""Width of rich's rendering off a terminal: wide enough that no table or line wraps in a CI log."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while the command ran: an interrupt (a ``KeyboardInterrupt``, so that code which
    cleans up on Ctrl-C cleans up here too) that the command line reports with its own exit code."""


def console(file: IO[str]) -> Any:
    """A rich console on ``file``: its terminal's width on a terminal; off one, no wrapping at all."""
    from rich.console import Console

    terminal = file.isatty() if hasattr(file, "isatty") else False
    if terminal:
        return Console(file=file)
    return Console(file=file, width=PIPED_WIDTH, soft_wrap=True)


def _flush_all() -> None:
    """Flush what the user's code left in a buffer, onto stderr while fd 1 points there: Python's streams,
    and ``fflush(NULL)`` for the C library's own stdout buffer, which a C extension may have printed to."""
    for stream in (sys.__stdout__, sys.stdout, sys.__stderr__, sys.stderr):
        with contextlib.suppress(AttributeError, OSError, ValueError):
            stream.flush()  # type: ignore[union-attr]
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


def _stdout_to_stderr(stdout: IO[str], stderr: IO[str]) -> int | None:
    """Point fd 1 at stderr; returns a duplicate of the real stdout, or ``None`` where the streams are not
    fds 1 and 2 (then only ``sys.stdout`` is redirected). The duplicate is not inherited by children."""
    with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
        if stdout.fileno() == 1 and stderr.fileno() == 2:
            stdout.flush()
            saved = os.dup(1)
            os.dup2(2, 1)
            return saved
    return None


def _write_fd(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a reader that went away: nobody is left to read the object
        while data:
            data = data[os.write(fd, data) :]


class Streams:
    """The command's stdout and stderr; ``machine`` reserves stdout for one JSON object.

    Args:
        machine: stdout carries one JSON object (``--json``, ``--format``), everything else goes to stderr.
        process: the command owns the process (see the module's docstring); else it is called in-process.
    """

    def __init__(self, machine: bool, *, process: bool = False) -> None:
        self.machine = machine
        self.process = process
        self.stdout: IO[str] = sys.stdout
        self.stderr: IO[str] = sys.stderr
        self.exit_code: int | None = None
        """The command's outcome, once :meth:`finish` has it."""
        self._json_fd: int | None = None  # the real stdout, while everything else goes to stderr
        self._owning = False  # write_json keeps the object for the end instead of writing it now
        self._pending: str | None = None
        self._running = False  # a SIGTERM now interrupts the command
        self._terminate = False  # a SIGTERM came: the command is (to be) interrupted
        self._pid = os.getpid()  # a child forked by the user's code (a DataLoader worker) owns nothing

    @contextlib.contextmanager
    def active(self) -> Iterator[Streams]:
        """Inside the block, in machine mode, everything written to stdout goes to stderr instead; owning the
        process, this lasts until it exits and SIGTERM is an interrupt."""
        if self.process:
            self._own_process()
            yield self  # nothing is given back: the process keeps this until it exits
            return
        if not self.machine:
            yield self
            return
        saved_fd = _stdout_to_stderr(self.stdout, self.stderr)
        previous = sys.stdout
        sys.stdout = self.stderr
        self._json_fd, self._owning = saved_fd, True
        try:
            yield self
        finally:
            self._emit()
            sys.stdout = previous
            if saved_fd is not None:
                os.dup2(saved_fd, 1)
                os.close(saved_fd)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """The command itself: a SIGTERM (also one that came before it began) raises :class:`Terminated`."""
        self._running = True
        try:
            if self._terminate:
                raise Terminated()
            yield
        finally:
            self._running = False

    def finish(self, code: int) -> None:
        """Record the command's outcome: from here a SIGTERM ends the process with it."""
        self.exit_code = code

    @property
    def people(self) -> IO[str]:
        """The stream for people's output: stderr in machine mode, else stdout."""
        return self.stderr if self.machine else self.stdout

    def write_json(self, payload: dict[str, Any]) -> None:
        """The one JSON object (plain text, never through rich: no escape codes). While the streams are
        active it is kept and written last, on the real stdout; a later object replaces an earlier one."""
        text = json.dumps(payload, indent=2) + "\n"
        if self._owning:
            self._pending = text
            return
        self.stdout.write(text)
        self.stdout.flush()

    # ------------------------------------------------------------------------------ owning the process

    def _own_process(self) -> None:
        self._pid = os.getpid()
        if self.machine:
            self._json_fd = _stdout_to_stderr(self.stdout, self.stderr)
            self._owning = True
            # A stream of the user's own on fd 1 (now stderr): closing it closes neither stderr nor the
            # object's stdout. Line-buffered, so that its lines interleave with stderr's in order.
            sys.stdout = (
                open(  # noqa: SIM115 - the process's stdout, open until it exits
                    1,
                    "w",
                    encoding=getattr(self.stdout, "encoding", None) or "utf-8",
                    errors=getattr(self.stdout, "errors", None) or "strict",
                    closefd=False,
                    buffering=1,
                )
                if self._json_fd is not None
                else self.stderr
            )
            atexit.register(self._at_exit)
        with contextlib.suppress(ValueError, OSError):  # not the main thread: no handler can be set
            if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:  # an ignored SIGTERM stays ignored
                signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked child ends as it would without autobatch
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.exit_code is not None:  # the outcome stands; stop waiting for the user's threads
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            self._emit()
            os._exit(self.exit_code)
        if self._terminate:
            return  # the first one is being handled: let the probe's clean-up finish
        self._terminate = True
        if self._running:
            raise Terminated()

    def _at_exit(self) -> None:
        if os.getpid() != self._pid:
            return
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nothing may come between the object and exit
        self._emit()

    def _emit(self) -> None:
        """Write the kept object, last: the user's buffered output goes out first (to stderr), and then the
        duplicate of the real stdout is closed, so nothing can follow it there."""
        _flush_all()
        text, self._pending, self._owning = self._pending, None, False
        fd, self._json_fd = self._json_fd, None
        if text is not None:
            if fd is not None:
                _write_fd(fd, text.encode())
            else:
                with contextlib.suppress(OSError, ValueError):
                    self.stdout.write(text)
                    self.stdout.flush()
        if fd is not None and self.process:
            os.close(fd)
