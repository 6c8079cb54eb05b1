"""The command line: ``autobatch probe MODEL``, ``autobatch predict MODEL``, ``autobatch demo`` and
``autobatch cache`` (also ``python -m autobatch``).

A thin front over the public API, one module per command (:mod:`autobatch.cli.probe`,
:mod:`autobatch.cli.predict`, :mod:`autobatch.cli.demo`, :mod:`autobatch.cli.cache`), each imported only when
it runs: ``--help``, ``--version`` and ``cache`` never import torch. With ``--json`` (or a ``--format``
export) stdout carries exactly one JSON object in every outcome (:class:`~autobatch.cli.io.Streams`),
whatever the user's code prints, raises or exits with.

Run as a program (the ``autobatch`` script, ``python -m autobatch``: :func:`main` without arguments), the
command owns the process until it exits: in machine mode fd 1 points at stderr from the start of the command,
and the JSON object is written after the user's ``atexit`` handlers and non-daemon threads have finished
(an ``atexit`` print or a late thread's lands on stderr). Called as ``main(argv)`` from Python, it restores
everything when it returns.

Exit codes, mapped from exception types: 0 success; 1 an error in the user's code or one of autobatch's
run-time verdicts (a user module that calls ``sys.exit`` included); 2 bad usage (arguments, specs:
:class:`~autobatch.errors.UsageError`); 3 nothing fits, or the micro-batch is below ``--min-batch`` (the CI
gate); 130 interrupted by Ctrl-C (SIGINT, ``KeyboardInterrupt``); 143 interrupted by SIGTERM (``timeout``, a
CI runner cancelling a job). Both interrupts are the ``"interrupted"`` outcome, with its JSON object; their
codes are the shell's 128 + the signal's number, what a job killed by that signal reports, so a runner that
reads 143 as "terminated" still does, and 130 and 143 say which signal it was.

May import: the public API (``autobatch``, :mod:`autobatch.api`, :mod:`autobatch.result`), the foundations,
the setup it parses flags into (:mod:`autobatch.options`, ``session``'s device checks, ``planner``, the
precision and memory-limit checks) and the cache's store (``autobatch cache``); nothing that runs a step.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from autobatch.cli.io import Streams, Terminated, console
from autobatch.cli.parser import build_parser, wants_json
from autobatch.errors import AutobatchError, NoBatchFitsError, UsageError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_NO_FIT",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "JSON_SCHEMA_VERSION",
    "error_payload",
    "main",
]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_FIT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143
JSON_SCHEMA_VERSION = 2
"""Version of the ``--json`` object's layout; bumped on any incompatible change (2: ``optimizer_steps``,
``plan.chunk_sizes``, ``verified``)."""

_COMMANDS = {
    "probe": "autobatch.cli.probe",
    "predict": "autobatch.cli.predict",
    "demo": "autobatch.cli.demo",
    "cache": "autobatch.cli.cache",
}


def error_payload(code: int, kind: str, message: str, exc: BaseException | None = None) -> dict[str, Any]:
    """The JSON object of a failed command; for :class:`NoBatchFitsError` with its figures."""
    payload: dict[str, Any] = {
        "schema_version": JSON_SCHEMA_VERSION,
        "ok": False,
        "exit_code": code,
        "error_kind": kind,
        "error": message,
    }
    if isinstance(exc, NoBatchFitsError):
        state = exc.model_state
        payload["memory_limit"] = exc.memory_limit
        payload["needed_bytes"] = exc.needed_bytes
        payload["model_state"] = (
            None
            if state is None
            else {
                "weights_bytes": state.weights,
                "gradients_bytes": state.gradients,
                "optimizer_state_bytes": state.optimizer,
                "estimated": state.estimated,
            }
        )
    return payload


def _classify(exc: BaseException) -> tuple[int, str, str]:
    """The exit code, kind and one-line message of what a command raised: by type, never by where."""
    if isinstance(exc, NoBatchFitsError):
        return EXIT_NO_FIT, "no batch fits", str(exc)
    if isinstance(exc, UsageError):
        return EXIT_USAGE, "error", str(exc)
    if isinstance(exc, Terminated):
        return EXIT_TERMINATED, "interrupted", "terminated by SIGTERM"
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted", "interrupted"
    if isinstance(exc, SystemExit):  # autobatch never exits mid-command: the user's code did
        return (
            EXIT_ERROR,
            "user code exited",
            f"the user's code called sys.exit({exc.code!r}) while autobatch ran it",
        )
    if isinstance(exc, AutobatchError):
        return EXIT_ERROR, "error", f"{type(exc).__name__}: {exc}"
    return EXIT_ERROR, "unexpected error", f"{type(exc).__name__}: {exc}"


def _report(streams: Streams, exc: BaseException, verbose: bool) -> int:
    code, kind, message = _classify(exc)
    # A closed or broken stderr (the user's code may close it) must not keep the JSON object from stdout.
    with contextlib.suppress(OSError, ValueError):
        err = console(streams.stderr)
        if code == EXIT_ERROR and kind != "user code exited":
            if verbose:
                err.print("".join(traceback.format_exception(exc)), markup=False, highlight=False)
            else:
                message += " (run with -v for the traceback)"
        # One line, however narrow the terminal: CI logs are read with grep.
        err.print(f"{kind}: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    if streams.machine:
        streams.write_json(error_payload(code, kind, message, exc))
    return code


def _logging(verbose: bool, stream: Any) -> logging.Handler:
    """autobatch's logs on ``stream`` (stderr) for this command; removed again by :func:`main`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("autobatch")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code.

    Args:
        argv: the arguments; ``None`` (the ``autobatch`` script, ``python -m autobatch``) reads
            ``sys.argv`` and makes the command own the process until it exits (see the module's docstring).
    """
    process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)  # --help and --version exit here, as argparse does
    except UsageError as exc:
        return _report(Streams(machine=wants_json(argv)), exc, verbose=False)
    verbose = bool(getattr(args, "verbose", False))
    machine = bool(getattr(args, "json", False)) or getattr(args, "format", "text") != "text"
    streams = Streams(machine=machine, process=process)
    handler = _logging(verbose, streams.stderr)
    try:
        with streams.active():
            try:
                with streams.interruptible():
                    command = importlib.import_module(_COMMANDS[args.command])
                    code = int(command.run(args, streams))
            except BaseException as exc:  # every outcome is reported, the user's sys.exit included
                code = _report(streams, exc, verbose)
            streams.finish(code)
            return code
    finally:
        logging.getLogger("autobatch").removeHandler(handler)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
