"""The command line's contract with CI, end to end through the real ``autobatch`` console script.

With ``--json``, ``autobatch probe`` prints exactly one JSON object on stdout in every outcome, and its
``exit_code`` is the process's: 0 ok; 1 the user's code raised or exited; 2 usage or spec errors; 3 nothing
fits or below ``--min-batch``; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM, also mid-probe, where the
probe still restores the model). Whatever the user's module prints (at import, in a factory, in ``forward``,
straight to file descriptor 1, from a thread or an ``atexit`` handler after the command) lands on stderr.
Each hostile module is a file in a fresh directory, named as ``path/to/file.py:attr`` or, from that
directory, as ``module:attr``.

``autobatch cache show|clear`` must survive a hostile cache directory (a FIFO, a symlink to ``/dev/zero``,
an oversized file, schema-invalid entries, a directory) without hanging: each bad file gets one warning.
``--help``, ``--version`` and ``cache`` must not import torch.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from autobatch.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NO_FIT,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    JSON_SCHEMA_VERSION,
)

AUTOBATCH = shutil.which("autobatch")
pytestmark = pytest.mark.slow  # every test runs the console script in a fresh interpreter
"""The console script of the environment the tests run in (``pip install -e .`` puts it next to python)."""

RANDOM_INPUTS = ("--input-shape", "8", "--num-classes", "2", "--samples", "256")
QUIET_CPU = ("--device", "cpu", "--precision", "fp32", "--memory-limit", "256KiB", "--no-progress")
ERROR_KEYS = {"schema_version", "ok", "exit_code", "error_kind", "error"}
NO_FIT_KEYS = ERROR_KEYS | {"memory_limit", "needed_bytes", "model_state"}
"""A no-fit error also carries its figures: the limit, the smallest one that would do, the model state."""
SUCCESS_KEYS = {"micro_batch", "max_fitting_batch", "cached", "verified", "optimizer_steps", "plan", "trials"}

HEADER = textwrap.dedent(
    """
    import os
    import sys

    import torch
    from torch import nn


    def tiny():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny()

        def forward(self, x):
            hook(x)
            return self.body(x)


    def hook(x):
        pass

    """
)
"""The start of every user module: ``tiny()`` is the model; ``Net`` calls ``hook`` in each forward."""


# ---------------------------------------------------------------------------------------------- helpers


_DROPPED = ("FORCE_COLOR", "NO_COLOR", "CLICOLOR_FORCE", "PYTHONPROFILEIMPORTTIME", "PYTHONUNBUFFERED")
"""Unset for every command. PYTHONUNBUFFERED especially: CPython then makes C stdio unbuffered too, and
output the user's code leaves in a buffer (the default in a CI job, where stdout is a pipe) goes unseen."""


def environment(cache_dir: Path) -> dict[str, str]:
    """The environment of a command: a private cache, one thread, default buffering, no forced colour."""
    assert AUTOBATCH is not None, "the autobatch console script is not on PATH: pip install -e ."
    environ = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    environ.update(AUTOBATCH_CACHE_DIR=str(cache_dir), OMP_NUM_THREADS="1")
    return environ


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """:func:`environment` with the cache in ``tmp_path/cache``."""
    return environment(tmp_path / "cache")


def autobatch(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the console script; a hang fails the test through ``subprocess.TimeoutExpired``."""
    assert AUTOBATCH is not None
    return subprocess.run(
        [AUTOBATCH, *args], env=env, cwd=cwd, timeout=timeout, capture_output=True, text=True, check=False
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"stdout holds {name}, which is not JSON")


def one_json(stdout: str) -> dict[str, Any]:
    """The one JSON object that is all of ``stdout`` (whitespace aside); strict JSON: no NaN or Infinity."""
    assert stdout.strip(), "stdout is empty: expected one JSON object"
    payload = json.loads(stdout, parse_constant=_no_constant)  # extra text before or after fails here
    assert isinstance(payload, dict), f"expected a JSON object on stdout, got {type(payload).__name__}"
    return payload


def expect(
    proc: subprocess.CompletedProcess[str], code: int, *, printed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The command's JSON object, after checking the exit code in it and of the process, and that each of
    ``printed`` (the user's output) is on stderr and not on stdout."""
    where = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    payload = one_json(proc.stdout)
    assert proc.returncode == code, where
    assert payload["exit_code"] == code, where
    assert payload["schema_version"] == JSON_SCHEMA_VERSION
    for text in printed:
        assert text in proc.stderr, f"{text!r} is not on stderr\n{where}"
        assert text not in proc.stdout, f"{text!r} leaked onto stdout\n{where}"
    return payload


def expect_error(
    proc: subprocess.CompletedProcess[str], code: int, kind: str, *, printed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The error object: exactly its five keys (eight for no fit), ``ok`` false, the kind, and its message
    on stderr."""
    payload = expect(proc, code, printed=printed)
    assert set(payload) == (NO_FIT_KEYS if kind == "no batch fits" else ERROR_KEYS), payload
    assert payload["ok"] is False
    assert payload["error_kind"] == kind, payload
    assert isinstance(payload["error"], str) and payload["error"]
    assert f"{kind}: {payload['error']}" in proc.stderr, proc.stderr
    return payload


def expect_success(
    proc: subprocess.CompletedProcess[str], *, printed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The probe's result object, exit 0."""
    payload = expect(proc, EXIT_OK, printed=printed)
    assert payload["ok"] is True, payload
    assert set(payload) >= SUCCESS_KEYS, sorted(payload)
    assert payload["error_kind"] is None and payload["error"] is None
    assert isinstance(payload["micro_batch"], int) and 1 <= payload["micro_batch"] <= 256
    assert payload["cached"] is False  # every probe here runs with --no-cache or on an empty cache
    assert payload["optimizer_steps"] >= 1
    return payload


def user_module(tmp_path: Path, name: str, body: str) -> Path:
    """Write ``HEADER + body`` as ``tmp_path/name.py``."""
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return path


def probe(spec: str, *extra: str, env: dict[str, str], cwd: Path | None = None, cache: bool = False) -> Any:
    """``autobatch probe SPEC`` on random inputs, on the CPU, with ``--json``."""
    flags = (*RANDOM_INPUTS, *QUIET_CPU, *(() if cache else ("--no-cache",)), "--json")
    return autobatch("probe", spec, *flags, *extra, env=env, cwd=cwd)


def both_specs(tmp_path: Path, path: Path, attr: str) -> list[tuple[str, Path | None]]:
    """The module named as ``path/to/file.py:attr`` (from elsewhere) and as ``module:attr`` (from its dir)."""
    return [(f"{path}:{attr}", None), (f"{path.stem}:{attr}", tmp_path)]


# ------------------------------------------------------------------------------ the user's code prints


def test_prints_at_import_and_in_the_factory_go_to_stderr(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "import_prints",
        """
        print("hello from import")

        def build():
            print("hello from factory")
            return tiny()
        """,
    )
    for spec, cwd in both_specs(tmp_path, path, "build"):
        proc = probe(spec, env=env, cwd=cwd)
        payload = expect_success(proc, printed=("hello from import", "hello from factory"))
        assert payload["device"] == "cpu" and payload["precision"] == "fp32"
        assert payload["memory_limit"] == 256 * 1024


def test_a_forward_that_prints_every_call(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "forward_prints",
        """
        def hook(x):
            print(f"hello from forward {len(x)}")
        """,
    )
    proc = probe(f"{path}:Net", env=env)
    payload = expect_success(proc, printed=("hello from forward",))
    for trial in payload["trials"]:  # every step's print went to stderr
        assert f"hello from forward {trial['batch']}" in proc.stderr


def test_a_raw_write_to_file_descriptor_1(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "raw_write",
        """
        os.write(1, b"raw fd write\\n")

        def hook(x):
            os.write(1, b"raw fd write in forward\\n")
        """,
    )
    proc = probe(f"{path}:Net", env=env)
    expect_success(proc, printed=("raw fd write\n", "raw fd write in forward"))


def test_a_buffered_write_to_the_original_stdout(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "dunder_stdout",
        """
        print("hello via sys.__stdout__", file=sys.__stdout__)  # buffered: stdout is a pipe
        """,
    )
    proc = probe(f"{path}:tiny", env=env)
    expect_success(proc, printed=("hello via sys.__stdout__",))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="calls glibc's printf through ctypes")
def test_a_c_library_printing_through_stdio(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "c_printf",
        """
        import ctypes

        ctypes.CDLL(None).printf(b"hello from C stdio\\n")  # buffered in libc: stdout is a pipe
        """,
    )
    proc = probe(f"{path}:tiny", env=env)
    expect_success(proc, printed=("hello from C stdio",))


def test_colour_forced_by_the_environment_stays_off_stdout(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "colour", "")
    env = {**env, "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    ok = probe(f"{path}:tiny", env=env)
    expect_success(ok)
    failed = probe(f"{path}:tiny", "--memory-limit", "1KiB", env=env)
    expect_error(failed, EXIT_NO_FIT, "no batch fits")
    usage = autobatch("probe", "--json", "--bogus", env=env)
    expect(usage, EXIT_USAGE)
    for proc in (ok, failed, usage):
        assert "\x1b" not in proc.stdout, proc.stdout
    assert "\x1b" in ok.stderr  # the people's output was coloured: FORCE_COLOR did reach rich


# ----------------------------------------------------------------------------- the user's code exits


@pytest.mark.parametrize(
    ("name", "body", "attr"),
    [
        ("exit_zero_at_import", "sys.exit(0)\n", "tiny"),
        ("exit_three_at_import", "sys.exit(3)\n", "tiny"),
        ("exit_in_factory", "def build():\n    sys.exit(0)\n", "build"),
        ("exit_in_forward", "def hook(x):\n    raise SystemExit('bye')\n", "Net"),
    ],
)
def test_the_users_code_exiting_is_exit_1(
    tmp_path: Path, env: dict[str, str], name: str, body: str, attr: str
) -> None:
    path = user_module(tmp_path, name, 'print("about to exit")\n' + body)
    for spec, cwd in both_specs(tmp_path, path, attr):
        proc = probe(spec, env=env, cwd=cwd)
        payload = expect_error(proc, EXIT_ERROR, "user code exited", printed=("about to exit",))
        assert "sys.exit" in payload["error"]


@pytest.mark.parametrize(
    ("name", "body", "attr"),
    [
        ("interrupt_at_import", "raise KeyboardInterrupt\n", "tiny"),
        ("interrupt_in_forward", "def hook(x):\n    raise KeyboardInterrupt\n", "Net"),
    ],
)
def test_an_interrupt_is_exit_130(
    tmp_path: Path, env: dict[str, str], name: str, body: str, attr: str
) -> None:
    path = user_module(tmp_path, name, 'print("about to interrupt")\n' + body)
    proc = probe(f"{path}:{attr}", env=env)
    expect_error(proc, EXIT_INTERRUPTED, "interrupted", printed=("about to interrupt",))


# ------------------------------------------------------------- the process after the command, SIGTERM


def test_an_atexit_handler_printing_goes_to_stderr(tmp_path: Path, env: dict[str, str]) -> None:
    """The object is written after the user's ``atexit`` handlers: their output lands on stderr."""
    path = user_module(
        tmp_path,
        "atexit_prints",
        """
        import atexit

        @atexit.register
        def goodbye():
            print("hello from atexit")
            os.write(1, b"raw write from atexit\\n")
        """,
    )
    expect_success(probe(f"{path}:tiny", env=env), printed=("hello from atexit", "raw write from atexit"))


@pytest.mark.parametrize("daemon", [False, True], ids=["thread", "daemon thread"])
def test_a_thread_printing_after_the_command_returns(
    tmp_path: Path, env: dict[str, str], daemon: bool
) -> None:
    """A thread that prints once the main thread is done (Python is joining threads or shutting down)."""
    path = user_module(
        tmp_path,
        "late_thread",
        f"""
        import atexit
        import threading
        import time

        printed = threading.Event()

        def late():
            while threading.main_thread().is_alive():
                time.sleep(0.01)
            print("hello from a late thread")
            os.write(1, b"raw write from a late thread\\n")
            printed.set()

        threading.Thread(target=late, daemon={daemon}).start()
        # A daemon thread is not joined: an atexit handler waits for it, so that it surely prints.
        atexit.register(printed.wait, 30)
        """,
    )
    proc = probe(f"{path}:tiny", env=env)
    expect_success(proc, printed=("hello from a late thread", "raw write from a late thread"))


def test_a_module_closing_stdout_at_import(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "closes_stdout", 'print("about to close stdout")\nsys.stdout.close()\n')
    expect_success(probe(f"{path}:tiny", env=env), printed=("about to close stdout",))


BLOCKS_MID_PROBE = """
    import atexit
    import time
    from pathlib import Path

    INITIAL = {}
    MODELS = []

    def build():
        model = Net()
        MODELS.append(model)
        INITIAL.update({k: v.clone() for k, v in model.state_dict().items()})

        @atexit.register
        def check():  # runs after the interrupted probe has cleaned up
            same = all(torch.equal(v, INITIAL[k]) for k, v in model.state_dict().items())
            print(f"weights restored: {same}")

        return model

    def hook(x):
        # Block in a step once the probe's steps have changed the weights (it must put them back).
        if any(not torch.equal(v, INITIAL[k]) for k, v in MODELS[0].state_dict().items()):
            print("the probe changed the weights")
            Path(__file__).with_name("in_probe").write_text("")
            while True:
                time.sleep(0.01)
    """
"""A model whose step blocks once the probe has trained it, and says at exit whether its weights are back."""


def _start(spec: str, *extra: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """``autobatch probe SPEC … --json`` started in the background (as :func:`probe` runs it)."""
    assert AUTOBATCH is not None
    flags = (*RANDOM_INPUTS, *QUIET_CPU, "--no-cache", "--json", *extra)
    return subprocess.Popen(
        [AUTOBATCH, "probe", spec, *flags],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _when(mark: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until ``mark`` exists (the user's code is where the test wants it); fail if the command ends."""
    deadline = time.monotonic() + timeout
    while not mark.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the command ended (exit {proc.returncode}) first\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{mark.name} never appeared")
        time.sleep(0.05)


def _finished(proc: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the command did not end after SIGTERM\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_sigterm_mid_probe_is_interrupted_with_its_json(
    tmp_path: Path, env: dict[str, str], signals: int
) -> None:
    """SIGTERM (``timeout``, a CI runner) while a step runs: exit 143 with its object, the weights restored;
    a second SIGTERM while the probe cleans up changes nothing."""
    path = user_module(tmp_path, "blocks_mid_probe", BLOCKS_MID_PROBE)
    proc = _start(f"{path}:build", env=env)
    _when(tmp_path / "in_probe", proc)
    for _ in range(signals):
        proc.send_signal(signal.SIGTERM)
    done = _finished(proc)
    expect_error(done, EXIT_TERMINATED, "interrupted", printed=("the probe changed the weights",))
    assert "weights restored: True" in done.stderr, done.stderr


def test_sigterm_at_import_is_interrupted_with_its_json(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "blocks_at_import",
        """
        import time
        from pathlib import Path

        print("importing")
        Path(__file__).with_name("importing").write_text("")
        time.sleep(600)
        """,
    )
    proc = _start(f"{path}:tiny", env=env)
    _when(tmp_path / "importing", proc)
    proc.send_signal(signal.SIGTERM)
    expect_error(_finished(proc), EXIT_TERMINATED, "interrupted", printed=("importing",))


def test_sigterm_while_python_waits_for_the_users_thread(tmp_path: Path, env: dict[str, str]) -> None:
    """The command has its outcome; a thread of the user's never ends. SIGTERM ends the wait: the outcome's
    object and exit code, nothing of the thread's on stdout."""
    path = user_module(
        tmp_path,
        "endless_thread",
        """
        import threading
        import time
        from pathlib import Path

        def endless():
            while threading.main_thread().is_alive():
                time.sleep(0.01)
            print("the command is done; this thread goes on")
            Path(__file__).with_name("main_done").write_text("")
            while True:
                time.sleep(0.01)

        threading.Thread(target=endless).start()
        """,
    )
    proc = _start(f"{path}:tiny", env=env)
    _when(tmp_path / "main_done", proc)
    proc.send_signal(signal.SIGTERM)
    expect_success(_finished(proc), printed=("the command is done; this thread goes on",))


# ------------------------------------------------------------------ the user's module reads sys.argv


def test_argparse_at_import_sees_no_autobatch_arguments(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(
        tmp_path,
        "argparse_at_import",
        """
        import argparse
        import json

        ARGS = argparse.ArgumentParser().parse_args()  # exits 2 on any argument
        print("ARGV=" + json.dumps(sys.argv))
        """,
    )
    for spec, cwd in both_specs(tmp_path, path, "tiny"):
        proc = probe(spec, env=env, cwd=cwd)
        expect_success(proc)
        program = str(path) if cwd is None else path.stem
        assert "ARGV=" + json.dumps([program]) in proc.stderr, proc.stderr


def test_a_module_asserting_an_empty_argv(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "argv_assert", "assert sys.argv[1:] == [], sys.argv\n")
    for spec, cwd in both_specs(tmp_path, path, "tiny"):
        expect_success(probe(spec, env=env, cwd=cwd))


def test_argparse_with_a_required_argument_fails_as_the_users_code(
    tmp_path: Path, env: dict[str, str]
) -> None:
    """The module sees no arguments at all: its own required one is missing, and it exits (exit 1)."""
    path = user_module(
        tmp_path,
        "argparse_required",
        """
        import argparse

        parser = argparse.ArgumentParser()
        parser.add_argument("--input-shape", required=True)  # autobatch's flag: the module must not see it
        ARGS = parser.parse_args()
        """,
    )
    proc = probe(f"{path}:tiny", env=env)
    expect_error(proc, EXIT_ERROR, "user code exited", printed=("--input-shape",))


# ------------------------------------------------------------------------------- the probe's verdicts


def test_a_bug_in_forward_is_an_unexpected_error(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "forward_bug", "def hook(x):\n    raise ValueError('the user bug')\n")
    proc = probe(f"{path}:Net", env=env)
    payload = expect_error(proc, EXIT_ERROR, "unexpected error")
    assert "ValueError: the user bug" in payload["error"]


def test_a_missing_import_inside_the_module_is_the_users_error(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "bad_import", "import autobatch_no_such_module_xyz\n")
    payload = expect_error(probe(f"{path}:tiny", env=env), EXIT_ERROR, "unexpected error")
    assert "autobatch_no_such_module_xyz" in payload["error"]


def test_nothing_fits(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "no_fit", "")
    proc = probe(f"{path}:tiny", "--memory-limit", "1KiB", env=env)
    payload = expect_error(proc, EXIT_NO_FIT, "no batch fits")
    assert payload["memory_limit"] == 1024 < payload["needed_bytes"]
    assert set(payload["model_state"]) == {
        "weights_bytes",
        "gradients_bytes",
        "optimizer_state_bytes",
        "estimated",
    }


def test_below_min_batch_is_exit_3_with_the_full_result(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "min_batch", "")
    reference = expect_success(probe(f"{path}:tiny", env=env))
    proc = probe(f"{path}:tiny", "--min-batch", "100000", env=env)
    payload = expect(proc, EXIT_NO_FIT)
    assert payload["ok"] is False
    assert payload["error_kind"] == "below --min-batch"
    assert set(payload) >= SUCCESS_KEYS
    assert payload["micro_batch"] == reference["micro_batch"]
    assert payload["min_batch"] == 100000
    assert str(payload["micro_batch"]) in payload["error"] and "100000" in payload["error"]
    assert payload["error"] in proc.stderr


# ------------------------------------------------------------------------------------------- predict

PREDICTED_KEYS = {"predicted", "gpu", "budget_bytes", "kernels", "prediction_notes"}


def predict(spec: str, *extra: str, env: dict[str, str]) -> Any:
    """``autobatch predict SPEC`` on random inputs, with ``--json``."""
    return autobatch("predict", spec, *RANDOM_INPUTS, "--no-progress", "--json", *extra, env=env)


def test_predict_keeps_the_probes_contract_and_adds_what_it_predicted(
    tmp_path: Path, env: dict[str, str]
) -> None:
    path = user_module(tmp_path, "predicted", "")
    payload = expect_success(predict(f"{path}:Net", "--gpu", "T4", "--max-batch", "64", env=env))
    assert set(payload) >= SUCCESS_KEYS | PREDICTED_KEYS
    assert payload["predicted"] is True and payload["gpu"] == "T4" and payload["kernels"] == "cuda:7.5"
    assert (
        payload["device"] == "cuda"
        and payload["memory_limit"] is None
        and payload["capped_by"] == "max_batch"
    )
    assert payload["budget_bytes"] == 15095 * 2**20 - 384 * 2**20  # the T4 less its CUDA context
    assert all(isinstance(note, str) for note in payload["prediction_notes"])
    assert all(t["role"] in ("cold", "steady") for t in payload["trials"])  # no step at full size
    below = predict(f"{path}:Net", "--gpu", "T4", "--max-batch", "64", "--min-batch", "100", env=env)
    assert expect(below, EXIT_NO_FIT)["error_kind"] == "below --min-batch"  # the CI gate for a card


def test_predict_refusals_and_no_fit_are_the_probes(tmp_path: Path, env: dict[str, str]) -> None:
    path = user_module(tmp_path, "predicted_errors", "")
    payload = expect_error(predict(f"{path}:tiny", "--gpu", "V100", env=env), EXIT_USAGE, "error")
    assert "Expected `gpu` to be one of T4" in payload["error"]
    payload = expect_error(predict(f"{path}:tiny", env=env), EXIT_USAGE, "error")
    assert "Expected `gpu` or `memory_limit`" in payload["error"]
    payload = expect_error(
        predict(f"{path}:tiny", "--memory-limit", "1KiB", env=env), EXIT_NO_FIT, "no batch fits"
    )
    assert payload["memory_limit"] == 1024 < payload["needed_bytes"]


# --------------------------------------------------------------------------------------- usage errors

USAGE_ERRORS = {
    "unknown flag": ("probe", "MODEL", "--bogus"),
    "max batch zero": ("probe", "MODEL", "--max-batch", "0"),
    "margin not a number": ("probe", "MODEL", "--margin", "abc"),
    "missing model": ("probe", "--input-shape", "8"),
    "unknown precision": ("probe", "MODEL", "--precision", "fp8"),
    "missing command": (),
}


def _usage_args(tmp_path: Path, args: tuple[str, ...]) -> list[str]:
    spec = f"{user_module(tmp_path, 'usage', '')}:tiny"
    return [spec if a == "MODEL" else a for a in args]


@pytest.mark.parametrize("args", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_under_json(tmp_path: Path, env: dict[str, str], args: tuple[str, ...]) -> None:
    proc = autobatch(*_usage_args(tmp_path, args), "--json", env=env)
    payload = expect_error(proc, EXIT_USAGE, "error")
    assert "autobatch" in payload["error"]  # argparse's own message, with the program's name


@pytest.mark.parametrize("args", USAGE_ERRORS.values(), ids=USAGE_ERRORS.keys())
def test_usage_errors_without_json(tmp_path: Path, env: dict[str, str], args: tuple[str, ...]) -> None:
    proc = autobatch(*_usage_args(tmp_path, args), env=env)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert proc.stdout == ""
    assert "error: autobatch" in proc.stderr


VALUE_ERRORS = {
    "margin out of range": ("--margin", "1.5"),
    "memory limit not a size": ("--memory-limit", "lots"),
    "input shape zero": ("--input-shape", "0"),
    "unknown device": ("--device", "tpu"),
    "indivisible target": ("--target-batch", "7", "--world-size", "2"),
    "two kinds of random inputs": ("--seq-len", "4"),
}


@pytest.mark.parametrize("args", VALUE_ERRORS.values(), ids=VALUE_ERRORS.keys())
def test_bad_values_found_after_parsing_are_usage_errors(
    tmp_path: Path, env: dict[str, str], args: tuple[str, ...]
) -> None:
    path = user_module(tmp_path, "values", "")
    expect_error(probe(f"{path}:tiny", *args, env=env), EXIT_USAGE, "error")


@pytest.mark.parametrize(
    ("spec", "found"),
    [
        ("nope.py:x", "does not exist"),
        ("autobatch_missing_module:x", "could not import module 'autobatch_missing_module'"),
        ("MODULE:not_there", "attribute 'not_there' not found"),
        ("MODULE:tiny.deeper", "attribute 'deeper' not found"),
        ("MODULE", "Expected model as"),
    ],
)
def test_spec_errors_under_json(tmp_path: Path, env: dict[str, str], spec: str, found: str) -> None:
    path = user_module(tmp_path, "spec", 'print("spec module ran")\n')
    spec = spec.replace("MODULE", str(path))
    proc = probe(spec, env=env, cwd=tmp_path)
    payload = expect_error(proc, EXIT_USAGE, "error")
    assert found in payload["error"], payload


def test_a_module_spec_from_the_working_directory_with_a_missing_attribute(
    tmp_path: Path, env: dict[str, str]
) -> None:
    user_module(tmp_path, "spec_cwd", 'print("spec module ran")\n')
    proc = probe("spec_cwd:not_there", env=env, cwd=tmp_path)
    payload = expect_error(proc, EXIT_USAGE, "error", printed=("spec module ran",))
    assert "attribute 'not_there' not found in module 'spec_cwd'" in payload["error"]


# ---------------------------------------------------------------------------------- the probe cache


@pytest.fixture(scope="module")
def real_entry(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A cache file written by a real ``autobatch probe`` (without ``--no-cache``), and that run's JSON."""
    root = tmp_path_factory.mktemp("real-entry")
    path = user_module(root, "cached_model", "")
    payload = expect_success(probe(f"{path}:tiny", env=environment(root / "cache"), cache=True))
    (entry,) = (root / "cache").glob("probe-*.json")
    return entry, payload


def _entry_name(key: str) -> str:
    return f"probe-{key[:40]}.json"


def _edited(data: dict[str, Any], edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """A copy of the entry ``data`` under a fresh key, with ``edit`` applied to its result."""
    copy = json.loads(json.dumps(data))
    copy["key"] = secrets.token_hex(32)
    edit(copy["result"])
    return copy


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(result: dict[str, Any]) -> None:
        result[field] = value

    return edit


def _trial_fitted_yes(result: dict[str, Any]) -> None:
    result["trials"][0]["fitted"] = "yes"


DEEP_JSON = "[" * 200_000
"""200 kB, far below the size limit, but nested deeper than Python's JSON decoder can recurse."""


SCHEMA_INVALID = {
    "micro_batch 10**9": _set("micro_batch", 10**9),
    "micro_batch '8'": _set("micro_batch", "8"),
    "trial fitted 'yes'": _trial_fitted_yes,
    "precision fp8": _set("precision", "fp8"),
    "negative seconds": _set("seconds", -1.0),
}


@pytest.fixture
def hostile_cache(tmp_path: Path, real_entry: tuple[Path, dict[str, Any]]) -> tuple[Path, Path, list[Path]]:
    """A cache directory holding one valid entry and every kind of bad file named like an entry.

    Returns the directory, the valid entry's path, and the bad files' paths.
    """
    directory = tmp_path / "hostile-cache"
    directory.mkdir()
    source, _ = real_entry
    valid = directory / source.name
    shutil.copyfile(source, valid)
    bad: list[Path] = []

    def bad_path() -> Path:
        bad.append(directory / _entry_name(secrets.token_hex(32)))
        return bad[-1]

    os.mkfifo(bad_path())
    bad_path().symlink_to("/dev/zero")
    prefix = b'{"format": 1, "key": "' + b"0" * 64 + b'", "padding": "'
    bad_path().write_bytes(prefix + b" " * (2 * 1024 * 1024) + b'"}')
    data = json.loads(source.read_text())
    for edit in SCHEMA_INVALID.values():
        copy = _edited(data, edit)
        path = directory / _entry_name(copy["key"])
        path.write_text(json.dumps(copy, indent=1))
        bad.append(path)
    bad_path().mkdir()
    return directory, valid, bad


def _one_warning_each(stderr: str, bad: list[Path]) -> None:
    for path in bad:
        assert stderr.count(str(path)) == 1, f"expected one warning naming {path}\n{stderr}"
    assert stderr.count("Ignoring the probe cache file") == len(bad), stderr


def test_cache_show_json_on_a_hostile_directory(
    env: dict[str, str], hostile_cache: tuple[Path, Path, list[Path]], real_entry: tuple[Path, Any]
) -> None:
    directory, valid, bad = hostile_cache
    _, probed = real_entry
    proc = autobatch("cache", "show", "--json", "--cache-dir", str(directory), env=env, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    payload = one_json(proc.stdout)
    assert payload["schema_version"] == JSON_SCHEMA_VERSION
    assert payload["directory"] == str(directory)
    (entry,) = payload["entries"]
    stored = json.loads(valid.read_text())
    assert entry == {
        "key": stored["key"],
        "path": str(valid),
        "created": stored["created"],
        "micro_batch": probed["micro_batch"],
        "device": "cpu",
        "precision": "fp32",
        "memory_limit": 256 * 1024,
        "model": "Sequential",
        "size_bytes": valid.stat().st_size,
    }
    assert valid.name == _entry_name(entry["key"])
    _one_warning_each(proc.stderr, bad)


def test_cache_show_text_on_a_hostile_directory(
    env: dict[str, str], hostile_cache: tuple[Path, Path, list[Path]], real_entry: tuple[Path, Any]
) -> None:
    directory, valid, bad = hostile_cache
    _, probed = real_entry
    proc = autobatch("cache", "show", "--cache-dir", str(directory), env=env, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    key = json.loads(valid.read_text())["key"]
    rows = [line for line in proc.stdout.splitlines() if key[:8] in line]
    assert len(rows) == 1, proc.stdout
    assert "Sequential" in rows[0] and f" {probed['micro_batch']} " in rows[0]
    assert f"1 result(s) in {directory}" in proc.stdout
    for path in bad:
        assert path.name[6:14] not in proc.stdout
    _one_warning_each(proc.stderr, bad)


def test_cache_clear_json_on_a_hostile_directory(
    env: dict[str, str], hostile_cache: tuple[Path, Path, list[Path]]
) -> None:
    directory, _, bad = hostile_cache
    proc = autobatch("cache", "clear", "--json", "--cache-dir", str(directory), env=env, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    payload = one_json(proc.stdout)
    assert payload["schema_version"] == JSON_SCHEMA_VERSION
    assert payload["directory"] == str(directory)
    assert payload["removed"] == len(bad)  # every file but the directory (the valid one included)
    assert sorted(directory.iterdir()) == [bad[-1]]  # the directory named like an entry is left alone
    assert bad[-1].is_dir()
    assert Path("/dev/zero").exists()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("json_flag", [("--json",), ()], ids=["json", "text"])
def test_cache_show_on_a_deeply_nested_entry(
    tmp_path: Path, env: dict[str, str], real_entry: tuple[Path, Any], json_flag: tuple[str, ...]
) -> None:
    directory = tmp_path / "deep-cache"
    directory.mkdir()
    valid = directory / real_entry[0].name
    shutil.copyfile(real_entry[0], valid)
    deep = directory / _entry_name(secrets.token_hex(32))
    deep.write_text(DEEP_JSON)
    proc = autobatch("cache", "show", *json_flag, "--cache-dir", str(directory), env=env, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    if json_flag:
        (entry,) = one_json(proc.stdout)["entries"]
        assert entry["path"] == str(valid)
    else:
        assert "1 result(s) in" in proc.stdout
    _one_warning_each(proc.stderr, [deep])


def _markup_entry(directory: Path, source: Path) -> dict[str, Any]:
    """An entry, valid to the schema, whose device and model name are rich markup that does not parse."""
    data = json.loads(source.read_text())
    data["key"] = secrets.token_hex(32)
    data["result"]["device"] = "[/device]"
    data["fingerprint"]["model"]["class"] = "evil.[/model]"
    (directory / _entry_name(data["key"])).write_text(json.dumps(data))
    return data


def test_cache_show_json_lists_strings_verbatim(
    tmp_path: Path, env: dict[str, str], real_entry: tuple[Path, Any]
) -> None:
    data = _markup_entry(tmp_path, real_entry[0])
    proc = autobatch("cache", "show", "--json", "--cache-dir", str(tmp_path), env=env, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    (entry,) = one_json(proc.stdout)["entries"]
    assert (entry["key"], entry["device"], entry["model"]) == (data["key"], "[/device]", "[/model]")


def test_cache_show_text_prints_strings_verbatim(
    tmp_path: Path, env: dict[str, str], real_entry: tuple[Path, Any]
) -> None:
    data = _markup_entry(tmp_path, real_entry[0])
    proc = autobatch("cache", "show", "--cache-dir", str(tmp_path), env=env, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    (row,) = [line for line in proc.stdout.splitlines() if data["key"][:8] in line]
    assert "[/device]" in row and "[/model]" in row


def _micro_batch_too_big(entry: Path) -> None:
    data = json.loads(entry.read_text())
    data["result"]["micro_batch"] = 10**9
    entry.write_text(json.dumps(data))


def _fifo(entry: Path) -> None:
    entry.unlink()
    os.mkfifo(entry)


def _deeply_nested(entry: Path) -> None:
    entry.write_text(DEEP_JSON)


@pytest.fixture(scope="module")
def stored_probe(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, dict[str, Any]]:
    """A user module, a cache directory holding its probe's entry, and the probe's result (made once:
    each test spoils a copy)."""
    root = tmp_path_factory.mktemp("stored")
    path = user_module(root, "reprobe", "")
    spec, cache = f"{path}:tiny", root / "cache"
    reference = expect_success(probe(spec, env=environment(cache), cache=True))
    assert reference["cached"] is False
    return spec, cache, reference


@pytest.mark.parametrize(
    "spoil",
    [
        _micro_batch_too_big,
        _fifo,
        pytest.param(
            _deeply_nested,
        ),
    ],
    ids=["micro_batch 10**9", "fifo", "deeply nested"],
)
def test_an_invalid_entry_for_the_probes_key_is_probed_again_and_rewritten(
    tmp_path: Path, stored_probe: tuple[str, Path, dict[str, Any]], spoil: Callable[[Path], None]
) -> None:
    spec, stored, reference = stored_probe
    shutil.copytree(stored, tmp_path / "cache")
    env = environment(tmp_path / "cache")
    (entry,) = Path(env["AUTOBATCH_CACHE_DIR"]).glob("probe-*.json")
    key = json.loads(entry.read_text())["key"]
    spoil(entry)

    proc = probe(spec, env=env, cache=True)
    payload = expect_success(proc)
    assert payload["micro_batch"] == reference["micro_batch"]
    assert payload["cached"] is False
    assert proc.stderr.count(str(entry)) == 1, proc.stderr  # one warning naming the bad file

    assert entry.is_file() and not entry.is_symlink()
    rewritten = json.loads(entry.read_text())
    assert rewritten["key"] == key
    assert rewritten["result"]["micro_batch"] == reference["micro_batch"]
    shown = autobatch("cache", "show", "--json", env=env, timeout=60)
    assert shown.returncode == EXIT_OK and "Ignoring" not in shown.stderr, shown.stderr
    (listed,) = one_json(shown.stdout)["entries"]
    assert listed["path"] == str(entry) and listed["micro_batch"] == reference["micro_batch"]

    again = expect(probe(spec, env=env, cache=True), EXIT_OK)  # and the rewritten entry answers
    assert again["cached"] is True and again["micro_batch"] == reference["micro_batch"]


# ---------------------------------------------------------------------------------------- start-up


def _imports(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules ``-X importtime`` (``PYTHONPROFILEIMPORTTIME``) reported on stderr."""
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


@pytest.mark.parametrize(
    "args",
    [("--help",), ("--version",), ("cache", "show"), ("cache", "clear")],
    ids=["help", "version", "cache show", "cache clear"],
)
def test_fast_commands_do_not_import_torch(
    env: dict[str, str], real_entry: tuple[Path, Any], tmp_path: Path, args: tuple[str, ...]
) -> None:
    shutil.copytree(real_entry[0].parent, env["AUTOBATCH_CACHE_DIR"])  # `show` reads a real entry
    proc = autobatch(*args, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)
    assert proc.returncode == EXIT_OK, proc.stderr
    imported = _imports(proc)
    assert "autobatch.cli" in imported  # the measurement saw the command's imports
    torch_modules = sorted(m for m in imported if m == "torch" or m.startswith("torch."))
    assert torch_modules == [], torch_modules[:10]


def test_the_import_check_sees_torch_in_a_probe(tmp_path: Path, env: dict[str, str]) -> None:
    """The control: the same measurement on a command that needs torch does report it."""
    path = user_module(tmp_path, "control", "")
    proc = autobatch(
        "probe", f"{path}:tiny", *RANDOM_INPUTS, *QUIET_CPU, "--no-cache", "--json",
        env={**env, "PYTHONPROFILEIMPORTTIME": "1"},
    )  # fmt: skip
    expect_success(proc)
    assert "torch" in _imports(proc)
