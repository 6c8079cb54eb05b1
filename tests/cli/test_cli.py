"""Tests for the command line (``autobatch probe|demo``).

Most run in-process through :func:`autobatch.cli.main` on tiny models in a module written to a fresh
working directory (named as ``module:attr``, importable as under ``python -m``); a few run end to end in
a subprocess (``python -m autobatch`` and the ``autobatch`` console script).
"""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import autobatch
import autobatch.api
from autobatch.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NO_FIT,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    JSON_SCHEMA_VERSION,
    main,
)
from autobatch.cli.parser import EXAMPLES, build_parser
from autobatch.demo import DEMO_MEMORY_LIMIT
from autobatch.units import format_bytes, parse_memory_limit

torch.set_num_threads(1)

CPU = ("--device", "cpu", "--precision", "fp32")
"""Put first, so that a test's own flags override them (argparse keeps the last value)."""

MODULE = textwrap.dedent(
    '''
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    LOSS_CALLS = []

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)

    def build():
        return net(), data()

    def counting_loss(outputs, targets):
        LOSS_CALLS.append(len(targets))
        return nn.functional.cross_entropy(outputs, targets)

    def with_options():
        return {"model": net(), "data": data(), "loss_fn": counting_loss, "max_batch": 20}

    def needs_args(width):
        return net()

    class Factories:
        @staticmethod
        def build():
            return build()

    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 4)

        def forward(self, x):
            raise RuntimeError("boom")

    class OwnValueError(Boom):
        def forward(self, x):
            raise ValueError("a bug in the user's forward")

    class TinyLM(nn.Module):
        """(batch, seq) tokens -> (batch, seq, vocab) logits."""

        def __init__(self, vocab=50, dim=8):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.head = nn.Linear(dim, vocab)

        def forward(self, tokens):
            return self.head(self.embed(tokens))

    class SeqClassifier(TinyLM):
        """(batch, seq) tokens -> (batch, 3) logits."""

        def __init__(self):
            super().__init__()
            self.cls = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.cls(self.embed(tokens).mean(1))

    model = net()
    tensors = data()
    dataset = TensorDataset(*tensors)
    loader = DataLoader(dataset, batch_size=8)
    not_a_model = 42
    '''
)

CONFIG_KEYS = {
    "hf": ("per_device_train_batch_size", "gradient_accumulation_steps"),
    "lightning": ("batch_size", "accumulate_grad_batches"),
    "deepspeed": ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"),
    "accelerate": ("batch_size", "gradient_accumulation_steps"),
}
"""Per tool: the micro-batch key, the accumulation key, then any others."""

PRECISION_SETTING = {
    "hf": lambda p: {"bf16": p == "bf16", "fp16": p == "fp16"},
    "lightning": lambda p: {"precision": {"fp16": "16-mixed", "bf16": "bf16-mixed", "fp32": "32-true"}[p]},
    "deepspeed": lambda p: {p: {"enabled": True}} if p != "fp32" else {},
    "accelerate": lambda p: {"mixed_precision": {"fp16": "fp16", "bf16": "bf16", "fp32": "no"}[p]},
}
"""Per tool: how it says the precision the probe measured."""


_names = itertools.count()


def _fresh_name(stem: str) -> str:
    return f"{stem}_{os.getpid()}_{next(_names)}"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe cache of the test's own, and no terminal settings inherited from the caller's shell."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "probe-cache"))
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tmp_path as the working directory; modules imported from it are dropped afterwards."""
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(("cli_", "_autobatch_spec_")):
            del sys.modules[name]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    importlib.invalidate_caches()
    return path


@pytest.fixture
def spec(workdir: Path) -> Callable[[str], str]:
    """Write MODULE under a fresh name into the working directory; returns ``attr -> "module:attr"``."""
    name = _fresh_name("cli_models")
    write(workdir / f"{name}.py", MODULE)
    return lambda attr: f"{name}:{attr}"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` → (exit code, stdout, stderr); argparse's own exits give their code too."""
    try:
        code = main(list(argv))
    except SystemExit as exc:  # --help, --version and argparse usage errors
        code = exc.code if isinstance(exc.code, int) else EXIT_USAGE
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def probe_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any], str]:
    """``autobatch probe --json`` on the CPU in fp32 → (exit code, the stdout object, stderr)."""
    code, out, err = run(capsys, "probe", *CPU, "--json", *argv)
    return code, json.loads(out), err


def flat(text: str) -> str:
    """rich wraps to the console width: compare text with its whitespace collapsed."""
    return " ".join(text.split())


_SIZE = re.compile(r"\b\d[\d.,]*\s*(?:[KMGT]i?B|bytes)\b")


def assert_sizes_written_one_way(text: str) -> None:
    """Every size in ``text`` is written as :func:`~autobatch.units.format_bytes` writes it (``640.00
    KiB``, which ``--memory-limit`` takes too), never ``640KiB`` beside it."""
    sizes = _SIZE.findall(text)
    assert sizes, "no sizes in the output"
    for size in sizes:
        assert re.fullmatch(r"\d+\.\d\d [KMG]iB", size), f"{size!r} is not written as format_bytes writes"
        assert format_bytes(parse_memory_limit(size)) == size  # type: ignore[arg-type]


def subprocess_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


# --- success: the result, as data ------------------------------------------------------------------


def test_exit_codes() -> None:
    assert (EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_FIT) == (0, 1, 2, 3)
    assert (EXIT_INTERRUPTED, EXIT_TERMINATED) == (128 + 2, 128 + 15)  # the shell's code of each signal


def test_json_is_one_object_with_the_result(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--target-batch", "32")
    assert code == EXIT_OK and out["ok"] is True and out["exit_code"] == 0 and out["error"] is None
    assert out["schema_version"] == JSON_SCHEMA_VERSION
    assert out["autobatch_version"] == autobatch.__version__
    assert out["device"] == "cpu" and out["precision"] == "fp32" and out["memory_limit"] == 64 * 1024
    trials = out["trials"]
    assert out["micro_batch"] == out["max_fitting_batch"] == max(t["batch"] for t in trials if t["fitted"])
    assert out["first_failure"] == out["micro_batch"] + 1 and out["capped_by"] is None
    assert out["ooms"] == sum(not t["fitted"] for t in trials) >= 1
    assert out["optimizer_steps"] >= len(trials)
    assert set(out["memory_model"]) == {"fixed_bytes", "bytes_per_sample"}
    assert out["memory_model"]["bytes_per_sample"] > 0
    assert out["plan"]["micro_batch"] == out["micro_batch"] and out["plan"]["effective_batch"] == 32
    assert out["plan"]["accumulation_steps"] == 1 and out["plan"]["world_size"] == 1
    assert "autobatch probe" in err  # the table, for people, on stderr


def test_json_plan_accumulates_across_ranks(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(
        capsys, spec("build"), "--memory-limit", "64KiB", "--max-batch", "11", "--target-batch", "64",
        "--world-size", "2",
    )  # fmt: skip
    assert code == EXIT_OK and out["micro_batch"] == 11 and out["capped_by"] == "max_batch"
    plan = out["plan"]
    assert plan["world_size"] == 2 and plan["effective_batch"] == 64 and plan["accumulation_steps"] == 3
    chunks = [size for size, count in plan["chunk_sizes"] for _ in range(count)]
    assert sum(chunks) * 2 == 64 and max(chunks) <= 11


def test_json_without_target_has_no_plan(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB")
    assert code == EXIT_OK and out["plan"] is None and out["config"] is None


def test_text_output_shows_trials_memory_model_and_plan(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "probe", *CPU, spec("build"), "--memory-limit", "64KiB", "--target-batch", "64",
        "--world-size", "2",
    )  # fmt: skip
    text = flat(out)
    assert code == EXIT_OK
    assert "autobatch probe: micro-batch" in text and "OOM" in text
    assert all(column in text for column in ("batch", "fits", "peak", "seconds"))
    assert "memory model:" in text and "× batch" in text
    assert "plan:" in text and "× 2 ranks = 64" in text
    assert err == ""  # no progress off a TTY


def test_memory_limit_moves_the_result(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, small, _ = probe_json(capsys, spec("build"), "--memory-limit", "40KiB")
    _, large, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB")
    assert 1 <= small["micro_batch"] < large["micro_batch"]


def test_optimizer_state_is_measured(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    state = {}
    for name in ("sgd", "adam", "adamw"):
        code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--optimizer", name)
        assert code == EXIT_OK
        state[name] = out["model_state_bytes"]
    assert state["sgd"] < state["adam"] == state["adamw"]  # momentum: one buffer; Adam: two


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precision_is_reported(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], precision: str
) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--precision", precision)
    assert code == EXIT_OK and out["precision"] == precision


def test_precision_auto_resolves(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--precision", "auto")
    assert code == EXIT_OK and out["precision"] in {"fp16", "bf16", "fp32"}


def test_search_options_reach_the_probe(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, capped, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--max-batch", "20")
    assert capped["micro_batch"] == 20 and capped["capped_by"] == "max_batch"
    _, rounded, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--multiple-of", "8")
    assert rounded["micro_batch"] % 8 == 0 and rounded["multiple_of"] == 8
    assert rounded["micro_batch"] <= rounded["max_fitting_batch"] < rounded["micro_batch"] + 8
    _, spared, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--margin", "0.5")
    assert spared["margin"] == 0.5 and spared["micro_batch"] <= spared["max_fitting_batch"] // 2


def test_min_batch_met_exits_0(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--min-batch", "8")
    assert code == EXIT_OK and out["ok"] is True and out["min_batch"] == 8


# --- where the model and data come from ---------------------------------------------------------


def test_model_factory_returning_model_and_data(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB")
    assert code == EXIT_OK and 1 <= out["micro_batch"] < 256


def test_dotted_attribute(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = probe_json(capsys, spec("Factories.build"), "--memory-limit", "64KiB")
    assert code == EXIT_OK and out["micro_batch"] >= 1


def test_dict_gives_model_data_and_probe_options(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(capsys, spec("with_options"), "--memory-limit", "64KiB", "--multiple-of", "8")
    assert code == EXIT_OK
    assert out["micro_batch"] == 16 and out["capped_by"] == "max_batch" and out["max_fitting_batch"] == 20
    module = sys.modules[spec("x").partition(":")[0]]
    assert module.LOSS_CALLS  # the dict's loss_fn ran the steps


def test_flags_given_win_over_the_dict_s_options(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(capsys, spec("with_options"), "--memory-limit", "64KiB", "--max-batch", "10")
    assert code == EXIT_OK and out["max_fitting_batch"] == 10 and out["capped_by"] == "max_batch"


@pytest.mark.parametrize("data", ["data", "tensors", "dataset", "loader"])
def test_data_spec(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], data: str) -> None:
    """--data names a factory, tensors (X, y), a Dataset or a DataLoader; the model an instance."""
    code, out, _ = probe_json(capsys, spec("model"), "--data", spec(data), "--memory-limit", "64KiB")
    assert code == EXIT_OK and 1 <= out["micro_batch"] < 256 and out["capped_by"] is None


def test_random_vectors_from_input_shape(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(
        capsys, spec("net"), "--input-shape", "16", "--num-classes", "4", "--samples", "128",
        "--memory-limit", "1MiB",
    )  # fmt: skip
    assert code == EXIT_OK and out["micro_batch"] == 128 and out["capped_by"] == "dataset"


def test_language_model_gets_a_token_loss(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """(B, L, V) logits against (B, L) targets: plain cross-entropy would fail on these shapes."""
    code, out, _ = probe_json(
        capsys, spec("TinyLM"), "--seq-len", "16", "--vocab", "50", "--memory-limit", "1MiB"
    )
    assert code == EXIT_OK and out["capped_by"] is None and 1 <= out["micro_batch"] < 4096


def test_sequence_classification(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = probe_json(
        capsys, spec("SeqClassifier"), "--seq-len", "16", "--vocab", "50", "--num-classes", "3",
        "--memory-limit", "256KiB",
    )  # fmt: skip
    assert code == EXIT_OK and out["capped_by"] is None and out["micro_batch"] >= 1


@pytest.mark.parametrize("form", ["relative", "bare", "absolute"])
def test_file_spec_imports_its_siblings(workdir: Path, capsys: pytest.CaptureFixture[str], form: str) -> None:
    """path/to/file.py:attr, where the file imports a module next to it (as `python file.py` allows)."""
    sibling = _fresh_name("cli_sibling")
    folder = workdir / "models" if form != "bare" else workdir
    write(
        folder / f"{sibling}.py",
        """
        from torch import nn

        def make():
            return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
        """,
    )
    net = write(
        folder / "net.py",
        f"""
        import torch
        from {sibling} import make

        def build():
            return make(), (torch.randn(256, 16), torch.randint(0, 4, (256,)))
        """,
    )
    path = {"relative": "models/net.py", "bare": "net.py", "absolute": str(net)}[form]
    code, out, _ = probe_json(capsys, f"{path}:build", "--memory-limit", "64KiB")
    assert code == EXIT_OK and out["micro_batch"] >= 1
    assert str(folder) not in sys.path  # the file's folder is importable only while it runs


# --- --format: the plan as other trainers' settings ------------------------------------------------


@pytest.mark.parametrize("tool", ["hf", "lightning", "deepspeed", "accelerate"])
@pytest.mark.parametrize(
    ("max_batch", "target", "world", "expected"),
    [(11, 32, 1, (8, 4)), (11, 64, 2, (8, 4)), (7, 30, 2, (5, 3)), (16, 32, 1, (16, 2))],
    ids=["uneven", "two-ranks", "two-ranks-odd", "even"],
)
def test_format_settings_multiply_to_the_target(
    spec: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    tool: str,
    max_batch: int,
    target: int,
    world: int,
    expected: tuple[int, int],
) -> None:
    code, out, _ = probe_json(
        capsys, spec("build"), "--memory-limit", "64KiB", "--max-batch", str(max_batch),
        "--target-batch", str(target), "--world-size", str(world), "--format", tool,
    )  # fmt: skip
    assert code == EXIT_OK and out["micro_batch"] == max_batch
    config = out["config"][tool]
    assert tuple(config)[: len(CONFIG_KEYS[tool])] == CONFIG_KEYS[tool]
    for key, value in PRECISION_SETTING[tool](out["precision"]).items():
        assert config[key] == value
    micro, acc = config[CONFIG_KEYS[tool][0]], config[CONFIG_KEYS[tool][1]]
    assert (micro, acc) == expected
    assert micro * acc * world == target and micro <= out["micro_batch"]
    if tool == "deepspeed":
        assert config["train_batch_size"] == target and config["optimizer"] == {"type": "AdamW"}
    if tool == "hf":
        assert config["optim"] == "adamw_torch"
    assert out["plan"]["effective_batch"] == target  # the autobatch plan stays alongside
    notes = " ".join(out["config_notes"])
    assert f"measured in {out['precision']}" in notes
    if out["plan"]["accumulation_steps"] != acc:  # an uneven plan, exported as the nearest equal split
        assert f"equal micro-batches of {micro} (the probe allows {max_batch}" in notes


def test_format_alone_prints_only_the_settings(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "probe", *CPU, spec("build"), "--memory-limit", "64KiB", "--max-batch", "11",
        "--target-batch", "32", "--format", "hf",
    )  # fmt: skip
    assert code == EXIT_OK
    assert json.loads(out) == {
        "per_device_train_batch_size": 8,
        "gradient_accumulation_steps": 4,
        "bf16": False,  # the spec's factory probes in fp32
        "fp16": False,
        "optim": "adamw_torch",
    }
    assert "autobatch probe: micro-batch 11" in flat(err) and "hf settings" in err
    assert "equal micro-batches of 8 (the probe allows 11, as 11+11+10): 4 micro-steps" in flat(err)


@pytest.mark.parametrize("tool", ["hf", "lightning", "deepspeed"])
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_format_without_target_batch_is_a_usage_error(
    spec: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tool: str,
    as_json: bool,
) -> None:
    """The settings hold gradient accumulation for a target batch: without one they would export 1."""

    def no_probe(*args: Any, **kwargs: Any) -> None:
        pytest.fail("probed although --format has no --target-batch")

    monkeypatch.setattr(autobatch.api, "probe", no_probe)
    json_flag = ("--json",) if as_json else ()
    code, out, err = run(capsys, "probe", *CPU, spec("build"), "--format", tool, *json_flag)
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1, err  # one line
    assert f"--format {tool} needs --target-batch" in err and "--target-batch 256" in err
    payload = json.loads(out)  # --format reserves stdout for one JSON object, with or without --json
    assert payload["exit_code"] == EXIT_USAGE and "needs --target-batch" in payload["error"]


# --- exit 3: nothing fits, or below --min-batch ---------------------------------------------------


def test_nothing_fits_exits_3(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = probe_json(capsys, spec("build"), "--memory-limit", "1KiB")
    assert code == EXIT_NO_FIT == 3
    state = out["model_state"]
    assert out == {
        "schema_version": JSON_SCHEMA_VERSION,
        "ok": False,
        "exit_code": 3,
        "error_kind": "no batch fits",
        "error": out["error"],
        "memory_limit": 1024,
        "needed_bytes": out["needed_bytes"],
        "model_state": {
            "weights_bytes": state["weights_bytes"],
            "gradients_bytes": state["gradients_bytes"],
            "optimizer_state_bytes": state["optimizer_state_bytes"],
            "estimated": False,  # the step that measured what is needed also made Adam's state
        },
    }
    # AdamW: two moments per parameter and a step counter per tensor.
    assert (
        0 < 2 * state["gradients_bytes"] < state["optimizer_state_bytes"] < 2 * state["gradients_bytes"] + 100
    )
    assert out["needed_bytes"] > state["weights_bytes"] + state["gradients_bytes"] > 1024
    assert "batch of 1" in out["error"]
    assert "no batch fits" in err

    # The figure is the smallest limit that does: at it the probe finds a batch, just below it none.
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", str(out["needed_bytes"]))
    assert code == EXIT_OK and out["micro_batch"] >= 1


def test_the_no_fit_hint_is_in_flag_syntax(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """The command line suggests flags (``--memory-limit 2.19MiB``), never Python (``memory_limit=``); the
    size it suggests, passed as it is written, makes a batch fit."""
    code, out, err = probe_json(capsys, spec("build"), "--memory-limit", "1KiB")
    assert code == EXIT_NO_FIT
    message = out["error"]
    (line,) = [line for line in err.splitlines() if line.startswith("no batch fits: ")]
    assert line == f"no batch fits: {message}"
    assert "memory_limit=" not in message and "precision=" not in message
    suggested = re.search(r"Try --memory-limit (\S+) or more", message)
    assert suggested is not None, message
    size = suggested.group(1)
    assert size == format_bytes(out["needed_bytes"], up=True).replace(" ", "")  # as every size is written
    assert parse_memory_limit(size) >= out["needed_bytes"]
    assert "--precision bf16" in message  # the probe ran in fp32
    assert "--optimizer sgd (less state than AdamW)" in message
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", size)
    assert code == EXIT_OK and out["micro_batch"] >= 1


def test_nothing_fits_in_text_mode(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "probe", *CPU, spec("build"), "--memory-limit", "1KiB")
    assert code == EXIT_NO_FIT and out == "" and "no batch fits" in err


def test_below_min_batch_exits_3_with_the_result(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--min-batch", "1000")
    assert code == EXIT_NO_FIT
    assert out["ok"] is False and out["exit_code"] == 3 and out["min_batch"] == 1000
    assert out["micro_batch"] < 1000 and "below --min-batch 1000" in out["error"]


def test_below_min_batch_reason_on_stderr_in_text_mode(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "probe", *CPU, spec("build"), "--memory-limit", "64KiB", "--min-batch", "1000")
    assert code == EXIT_NO_FIT and "below --min-batch 1000" in flat(err)


# --- exit 2: usage and spec errors --------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "extra", "message"),
    [
        ("no_colon", [], "Expected model as 'package.module:attr' or 'path/to/file.py:attr'"),
        ("{m}:", [], "but got '{m}:'"),
        ("{m}:net.", [], "but got '{m}:net.'"),
        ("autobatch_no_such_module_xyz:net", [], "could not import module 'autobatch_no_such_module_xyz'"),
        ("autobatch_no_such_pkg_xyz.sub:net", [], "could not import module 'autobatch_no_such_pkg_xyz.sub'"),
        ("nowhere/net.py:build", [], "file 'nowhere/net.py' does not exist"),
        ("{m}:missing", [], "attribute 'missing' not found in module '{m}'"),
        ("{m}:Factories.missing", [], "attribute 'missing' not found in 'Factories'"),
        ("{m}:not_a_model", [], "gave int; expected an nn.Module"),
        ("{m}:needs_args", [], "'{m}:needs_args' is a callable that needs arguments"),
        ("{m}:net", [], "No data: pass --data SPEC"),
        ("{m}:model", ["--data", "{m}:needs_args"], "--data '{m}:needs_args' is a callable that needs"),
        ("{m}:model", ["--data", "{m}:not_a_model"], "Expected `data` to be a torch Dataset"),
        ("{m}:model", ["--data", "{m}:data", "--input-shape", "16"], "either --data or random inputs"),
        ("{m}:build", ["--data", "{m}:data"], "already gives its data"),
        ("{m}:TinyLM", ["--seq-len", "16"], "--seq-len needs --vocab"),
        ("{m}:net", ["--input-shape", "16", "--seq-len", "8", "--vocab", "9"], "not both"),
        ("{m}:net", ["--input-shape", "3,x"], "Expected --input-shape as positive ints"),
        ("{m}:net", ["--input-shape", "3,0"], "but got '3,0'"),
        ("{m}:build", ["--memory-limit", "lots"], "Expected `memory_limit` to be a size"),
        ("{m}:build", ["--margin", "1.5"], "Expected `margin` to be a fraction"),
        ("{m}:build", ["--device", "banana"], "Expected `device` to be a device"),
    ],
    ids=[
        "no-colon", "empty-attr", "empty-dotted-part", "no-module", "no-parent-package", "no-file",
        "no-attribute", "no-dotted-attribute", "int", "factory-needs-args", "no-data",
        "data-factory-needs-args", "data-int", "data-and-input-shape", "data-twice", "seq-len-no-vocab",
        "input-shape-and-seq-len", "bad-input-shape", "zero-in-input-shape", "bad-memory-limit",
        "bad-margin", "bad-device",
    ],
)  # fmt: skip
def test_usage_errors_exit_2(
    spec: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    model: str,
    extra: list[str],
    message: str,
) -> None:
    module = spec("x").partition(":")[0]
    argv = [arg.format(m=module) for arg in (model, *extra)]
    code, out, err = run(capsys, "probe", *CPU, "--memory-limit", "64KiB", *argv)
    assert code == EXIT_USAGE == 2
    assert out == ""
    assert flat(err).startswith("error: ") and message.format(m=module) in flat(err)
    assert "Traceback" not in err and "run with -v" not in err


def test_usage_error_as_json(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = probe_json(capsys, spec("not_a_model"), "--input-shape", "16")
    assert code == EXIT_USAGE
    assert out["ok"] is False and out["exit_code"] == 2 and "gave int" in out["error"]
    assert "gave int" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where CUDA is absent")
def test_cuda_device_without_cuda_exits_2(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "probe", spec("build"), "--device", "cuda:0", "--memory-limit", "8GiB")
    assert code == EXIT_USAGE and "CUDA is not available" in flat(err)


def test_indivisible_target_exits_2_before_probing(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_probe(*args: Any, **kwargs: Any) -> None:
        pytest.fail("probed despite an indivisible --target-batch")

    monkeypatch.setattr(autobatch.api, "probe", no_probe)  # what the command calls
    code, out, err = run(capsys, "probe", *CPU, spec("build"), "--target-batch", "33", "--world-size", "2")
    assert code == EXIT_USAGE and out == ""
    assert "target_batch=33 is not divisible by world_size=2" in flat(err)
    assert "nearest valid targets: 32 or 34" in flat(err)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--samples", "0"], "argument --samples: expected a positive int, but got '0'"),
        (["--world-size", "0"], "argument --world-size"),
        (["--target-batch", "x"], "argument --target-batch"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        (["--precision", "fp8"], "argument --precision: invalid choice"),
        (["--format", "yaml"], "argument --format: invalid choice"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_argparse_errors_exit_2(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    code, out, err = run(capsys, "probe", *CPU, spec("build"), "--input-shape", "16", *extra)
    assert code == EXIT_USAGE and out == "" and message in flat(err)


def test_missing_command_or_model_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys)[0] == EXIT_USAGE
    code, _, err = run(capsys, "probe")
    assert code == EXIT_USAGE and "model" in err


def test_spec_error_is_one_line_off_a_tty(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "probe", *CPU, spec("needs_args"), "--input-shape", "16")
    assert code == EXIT_USAGE and len(err.strip().splitlines()) == 1


# --- exit 1: the user's own errors --------------------------------------------------------------


def test_error_in_forward_exits_1(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "probe", *CPU, spec("Boom"), "--input-shape", "16", "--num-classes", "4")
    assert code == EXIT_ERROR == 1 and out == ""
    assert "unexpected error: RuntimeError: boom" in flat(err) and "-v" in err
    assert "Traceback" not in err


def test_verbose_prints_the_traceback(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "-v", "probe", *CPU, spec("Boom"), "--input-shape", "16", "--num-classes", "4")
    assert code == EXIT_ERROR
    assert "Traceback" in err and 'raise RuntimeError("boom")' in err
    assert "unexpected error: RuntimeError: boom" in flat(err)


def test_unexpected_error_as_json(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = probe_json(capsys, spec("Boom"), "--input-shape", "16", "--num-classes", "4")
    assert code == EXIT_ERROR
    assert out["ok"] is False and out["exit_code"] == 1 and "RuntimeError: boom" in out["error"]


@pytest.mark.parametrize("form", ["module", "file"])
def test_missing_import_inside_the_users_module_exits_1(
    workdir: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """The spec resolves; the module's own import fails: the user's bug, not a spec error."""
    name = _fresh_name("cli_broken")
    write(workdir / f"{name}.py", "import autobatch_missing_dependency_xyz\nmodel = None\n")
    model = f"{name}:model" if form == "module" else f"./{name}.py:model"
    code, _, err = run(capsys, "probe", *CPU, model, "--input-shape", "16")
    assert code == EXIT_ERROR
    assert "unexpected error: ModuleNotFoundError" in flat(err)
    assert "autobatch_missing_dependency_xyz" in flat(err)


def test_value_error_in_the_users_forward_exits_1(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "probe", *CPU, spec("OwnValueError"), "--input-shape", "16")
    assert code == EXIT_ERROR and "unexpected error: ValueError" in flat(err) and "-v" in err


def test_verbose_after_the_subcommand(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "probe", *CPU, spec("Boom"), "--input-shape", "16", "--num-classes", "4", "-v")
    assert code == EXIT_ERROR and "Traceback" in err


# --- progress and terminals ---------------------------------------------------------------------


def test_progress_hidden_off_a_tty(spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = probe_json(capsys, spec("build"), "--memory-limit", "64KiB")
    assert code == EXIT_OK and "probing" not in err and "\x1b" not in err


def test_progress_on_stderr_on_a_terminal(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then treats the streams as terminals
    code, out, err = run(capsys, "probe", *CPU, "--json", spec("build"), "--memory-limit", "64KiB")
    assert code == EXIT_OK and "probing: batch" in err
    assert "\x1b" not in out and json.loads(out)["micro_batch"] >= 1


def test_no_progress_flag(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    code, _, err = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", "--no-progress")
    assert code == EXIT_OK and "probing" not in err and "autobatch probe" in err


# --- help, version, demo ------------------------------------------------------------------------


def test_help_has_examples_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == EXIT_OK
    assert "examples:" in out and "autobatch probe" in out and "autobatch demo" in out
    assert "exit codes: 0 ok · 1 unexpected error · 2 usage or spec error · 3 nothing fits" in out


def test_probe_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "probe", "--help")
    assert code == EXIT_OK and "examples:" in out and "exit codes:" in out
    options = (
        "--data --input-shape --num-classes --seq-len --vocab --samples --optimizer --precision "
        "--memory-limit --device --target-batch --world-size --max-batch --margin --multiple-of "
        "--min-batch --json --format --no-progress"
    )
    assert all(option in out for option in options.split())
    assert "adamw,adam,sgd" in out and "auto,fp16,bf16,fp32" in out and "text,hf,lightning,deepspeed" in out


def test_probe_help_says_what_the_command_line_does_without_device(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "probe", "--help")
    text = flat(out)
    assert code == EXIT_OK
    device_help = text[text.rindex("--device DEVICE") : text.rindex("--emulation")]  # past the usage
    assert "(default: CUDA when available, then MPS, else the CPU" in device_help, device_help
    assert "fit:" not in device_help and "the model's" not in device_help


def _first_example() -> list[str]:
    """The help's first example, as the shell would split it (continuation lines joined)."""
    lines = EXAMPLES.splitlines()[1:]
    command = ""
    for line in lines:
        command += line.split("  #")[0].strip()
        if not command.endswith("\\"):
            break
        command = command[:-1] + " "
    return shlex.split(command)


@pytest.mark.slow
def test_the_helps_first_example_runs_on_a_plain_install(capsys: pytest.CaptureFixture[str]) -> None:
    """No torchvision or download: it runs as a newcomer copies it (here without the cache)."""
    argv = _first_example()
    assert argv[:2] == ["autobatch", "probe"] and "examples:\n  " + argv[0] in EXAMPLES
    code, out, err = run(capsys, *argv[1:], "--no-cache", "--no-progress")
    assert code == EXIT_OK, err
    assert "autobatch probe: micro-batch" in flat(out) and "plan:" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == EXIT_OK and out.strip() == f"autobatch {autobatch.__version__}"


def test_demo_one_epoch_json(capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the demo explains BatchNorm in words instead of warning
        code, out, err = run(capsys, "demo", "--epochs", "1", "--json")
    assert code == EXIT_OK
    assert "About BatchNorm: the CNN normalises each micro-batch" in flat(err)
    assert "on an emulated device of 640.00 KiB" in flat(err)
    assert_sizes_written_one_way(err)
    result = json.loads(out)
    assert result["schema_version"] == JSON_SCHEMA_VERSION and result["epochs"] == 1
    assert result["plan"]["accumulation_steps"] > 1 and result["plan"]["effective_batch"] == 32
    assert result["probe"]["micro_batch"] < 32
    accuracy = result["evals"][-1]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and accuracy == result["evals"][-1]["report"]["accuracy"]
    assert result["samples"] == 1347


# --- end to end, in a subprocess (each pays for importing torch) ----------------------------------


def test_python_m_autobatch_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "autobatch", "--version"],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"autobatch {autobatch.__version__}"


def test_python_m_json_stdout_is_clean_under_force_color(spec: Callable[[str], str]) -> None:
    """FORCE_COLOR=1: the table and progress (with escape codes) on stderr, pure JSON on stdout."""
    done = subprocess.run(
        [sys.executable, "-m", "autobatch", "probe", spec("build"), *CPU, "--memory-limit", "64KiB",
         "--target-batch", "32", "--json"],
        capture_output=True, text=True, env=subprocess_env(FORCE_COLOR="1"), timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_OK, done.stderr
    assert "\x1b" not in done.stdout
    out = json.loads(done.stdout)
    assert out["ok"] is True and out["plan"]["effective_batch"] == 32
    assert "\x1b[" in done.stderr and "autobatch probe" in done.stderr


def test_console_script_min_batch_gate(spec: Callable[[str], str]) -> None:
    """The installed `autobatch` script passes main()'s exit code through: 3 below --min-batch."""
    script = shutil.which("autobatch")
    if script is None:
        pytest.skip("the autobatch console script is not on PATH")
    done = subprocess.run(
        [script, "probe", spec("build"), *CPU, "--memory-limit", "64KiB", "--min-batch", "1000",
         "--format", "deepspeed", "--target-batch", "64", "--json"],
        capture_output=True, text=True, env=subprocess_env(FORCE_COLOR="1"), timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NO_FIT, done.stderr
    assert "\x1b" not in done.stdout
    out = json.loads(done.stdout)
    assert out["ok"] is False and out["exit_code"] == 3 and "below --min-batch" in out["error"]
    assert out["config"]["deepspeed"]["train_batch_size"] == 64


# --- the probe cache from the command line ----------------------------------------------------------


def test_second_probe_comes_from_the_cache_and_no_cache_skips_it(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = (spec("build"), "--memory-limit", "48KiB", "--cache-dir", str(tmp_path / "cache"))
    _, first, _ = probe_json(capsys, *args)
    _, second, _ = probe_json(capsys, *args)
    _, fresh, _ = probe_json(capsys, *args, "--no-cache")
    assert (first["cached"], second["cached"], fresh["cached"]) == (False, True, False)
    assert first["micro_batch"] == second["micro_batch"] == fresh["micro_batch"]
    assert second["trials"] == first["trials"]


def test_a_changed_setup_is_probed_again(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = ("--cache-dir", str(tmp_path / "cache"))
    probe_json(capsys, spec("build"), "--memory-limit", "48KiB", *cache)
    _, other_limit, _ = probe_json(capsys, spec("build"), "--memory-limit", "64KiB", *cache)
    _, other_optimizer, _ = probe_json(
        capsys, spec("build"), "--memory-limit", "48KiB", "--optimizer", "sgd", *cache
    )
    assert other_limit["cached"] is False and other_optimizer["cached"] is False


def test_cache_show_and_clear(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = ("--cache-dir", str(tmp_path / "cache"))
    _, probed, _ = probe_json(capsys, spec("build"), "--memory-limit", "48KiB", *cache)

    code, out, _ = run(capsys, "cache", "show", "--json", *cache)
    shown = json.loads(out)
    assert code == EXIT_OK and shown["directory"] == str(tmp_path / "cache")
    assert [e["micro_batch"] for e in shown["entries"]] == [probed["micro_batch"]]
    assert shown["entries"][0]["memory_limit"] == 48 * 1024 and shown["entries"][0]["model"] == "Sequential"

    code, out, _ = run(capsys, "cache", "show", *cache)
    assert code == EXIT_OK and "Sequential" in out and "1 result(s)" in flat(out)

    code, out, _ = run(capsys, "cache", "clear", "--json", *cache)
    assert code == EXIT_OK and json.loads(out)["removed"] == 1
    code, out, _ = run(capsys, "cache", "show", "--json", *cache)
    assert json.loads(out)["entries"] == []


def test_cache_dir_comes_from_the_environment(
    spec: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "env-cache"))
    probe_json(capsys, spec("build"), "--memory-limit", "48KiB")
    code, out, _ = run(capsys, "cache", "show", "--json")
    assert code == EXIT_OK and json.loads(out)["directory"] == str(tmp_path / "env-cache")
    assert len(json.loads(out)["entries"]) == 1


def test_the_emulation_flag_reaches_the_probe(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "8MiB", "--emulation", "allocator")
    assert code == EXIT_OK and out["limit_kind"] == "8.00 MiB (emulated, CUDA's caching allocator)"
    assert all(t["reserved_bytes"] is not None for t in out["trials"] if t["fitted"])
    code, out, _ = probe_json(capsys, spec("build"), "--memory-limit", "8MiB", "--emulation", "ideal")
    assert code == EXIT_OK and out["limit_kind"] == "8.00 MiB (emulated)"


# --- a newcomer's output: piped text, empty states, help defaults, the cache said -------------------


def test_piped_text_output_is_never_wrapped_mid_line(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "probe", *CPU, spec("build"), "--memory-limit", "48KiB", "--no-cache")
    assert code == EXIT_OK
    (limit_line,) = [line for line in out.splitlines() if line.startswith("limit ")]
    assert len(limit_line) > 80  # longer than a default console, and still one line
    assert "model state" in limit_line and "optimizer state" in limit_line and limit_line.endswith(")")


def test_format_prints_its_settings_as_json_on_stderr_too(
    spec: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ("probe", *CPU, spec("build"), "--memory-limit", "48KiB", "--no-cache", "--target-batch", "32")
    code, out, err = run(capsys, *argv, "--format", "hf")
    assert code == EXIT_OK
    (line,) = [line for line in err.splitlines() if line.startswith("hf settings")]
    settings = json.loads(line.split(": ", 1)[1])  # JSON on one line, not a wrapped Python dict
    assert settings == json.loads(out)


def test_an_empty_cache_says_so_instead_of_drawing_an_empty_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "cache", "show", "--cache-dir", str(tmp_path / "none"))
    assert code == EXIT_OK and "┏" not in out
    assert flat(out).startswith(f"No cached probe results in {tmp_path / 'none'}")


def test_demo_help_shows_the_defaults_and_the_cache_directory_in_use(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "here"))
    code, out, _ = run(capsys, "demo", "--help")
    text = flat(out)
    assert code == EXIT_OK
    for default in ("(default: 4)", "(default: 32)", "(default: 640.00 KiB)", "(default: 0)"):
        assert default in text
    demo = build_parser().parse_args(["demo"])
    assert parse_memory_limit(demo.memory_limit) == parse_memory_limit(DEMO_MEMORY_LIMIT) == 640 * 1024
    # argparse wraps long paths at their hyphens: compare without any whitespace
    assert f"here{tmp_path / 'here'}" in "".join(out.split())


@pytest.mark.slow
def test_the_demo_says_when_its_probe_came_from_the_cache(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "fresh"))
    code, first, first_err = run(capsys, "demo", "--epochs", "1")
    assert code == EXIT_OK and "cache" not in flat(first + first_err).lower()  # a first run probes
    code, again, again_err = run(capsys, "demo", "--epochs", "1")
    said = flat(again + again_err)
    assert code == EXIT_OK and "came from the probe cache" in said and "--no-cache to probe afresh" in said
