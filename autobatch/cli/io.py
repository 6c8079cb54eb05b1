"""Where the command line writes, whatever the user's code does.

With ``--json`` (or a ``--format`` export) stdout carries exactly one JSON object. :class:`Streams` keeps the
real stdout for that object and, for the whole command, points both ``sys.stdout`` and file descriptor 1 at
stderr: a ``print`` in the user's module or forward, or a C library writing to fd 1, lands on stderr, never
in the object. Output for people goes through rich consoles that do not wrap lines when piped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator
from typing import IO, Any

__all__ = ["Streams", "console"]

PIPED_WIDTH = 160
"""Width of rich's rendering off a terminal: wide enough that no table or line wraps in a CI log."""


def console(file: IO[str]) -> Any:
    """A rich console on ``file``: its terminal's width on a terminal; off one, no wrapping at all."""
    from rich.console import Console

    terminal = file.isatty() if hasattr(file, "isatty") else False
    if terminal:
        return Console(file=file)
    return Console(file=file, width=PIPED_WIDTH, soft_wrap=True)


def _flush_c_stdio() -> None:
    """``fflush(NULL)``: the C library's own stdout buffer, which a C extension may have printed to."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)


class Streams:
    """The command's stdout and stderr; ``machine`` reserves stdout for one JSON object."""

    def __init__(self, machine: bool) -> None:
        self.machine = machine
        self.stdout: IO[str] = sys.stdout
        self.stderr: IO[str] = sys.stderr
        self._saved: tuple[Any, int | None] | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[Streams]:
        """Inside the block, in machine mode, everything written to stdout goes to stderr instead."""
        if not self.machine:
            yield self
            return
        saved_fd = None
        with contextlib.suppress(AttributeError, OSError, ValueError, io.UnsupportedOperation):
            if self.stdout.fileno() == 1 and self.stderr.fileno() == 2:
                self.stdout.flush()
                saved_fd = os.dup(1)
                os.dup2(2, 1)
        previous = sys.stdout
        sys.stdout = self.stderr
        self._saved = (previous, saved_fd)
        try:
            yield self
        finally:
            # What the user's code left in a buffer belongs on stderr too: flush Python's streams and C's
            # stdio while fd 1 still points there.
            for stream in (sys.__stdout__, sys.stdout, sys.stderr):
                with contextlib.suppress(AttributeError, OSError, ValueError):
                    stream.flush()  # type: ignore[union-attr]
            _flush_c_stdio()
            sys.stdout = previous
            if saved_fd is not None:
                os.dup2(saved_fd, 1)
                os.close(saved_fd)
            self._saved = None

    @property
    def people(self) -> IO[str]:
        """The stream for people's output: stderr in machine mode, else stdout."""
        return self.stderr if self.machine else self.stdout

    def write_json(self, payload: dict[str, Any]) -> None:
        """The one JSON object, on the real stdout (plain text, never through rich: no escape codes)."""
        text = json.dumps(payload, indent=2) + "\n"
        saved_fd = self._saved[1] if self._saved is not None else None
        if saved_fd is not None:
            os.write(saved_fd, text.encode())
            return
        self.stdout.write(text)
        self.stdout.flush()
