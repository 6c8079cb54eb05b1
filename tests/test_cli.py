"""Tests for the command line (``autobatch probe|demo``), run in-process through autobatch.cli.main."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import autobatch
from autobatch.cli import EXIT_BELOW_MIN, EXIT_NO_FIT, EXIT_USAGE, main

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))

    def data():
        g = torch.Generator().manual_seed(0)
        return torch.randn(256, 16, generator=g), torch.randint(0, 4, (256,), generator=g)

    def build():
        return net(), data()

    def with_options():
        return {"model": net(), "data": data(), "loss_fn": nn.functional.cross_entropy}

    model = net()
    not_a_model = 42
    """
)

_names = itertools.count()


@pytest.fixture
def helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], str]:
    """Write the helper module under a fresh name in tmp_path; returns ``attr -> "module:attr"``."""
    name = f"autobatch_cli_case_{os.getpid()}_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return lambda attr: f"{name}:{attr}"


def probe_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = main(["probe", *argv, "--json", "--device", "cpu", "--precision", "fp32"])
    return code, json.loads(capsys.readouterr().out)


def test_probe_json(helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = probe_json(capsys, helper("build"), "--memory-limit", "32KiB", "--optimizer", "sgd")
    assert code == 0
    assert out["ok"] is True
    assert isinstance(out["micro_batch"], int) and 1 <= out["micro_batch"] < 256
    assert out["memory_limit"] == 32 * 1024 and out["precision"] == "fp32"
    assert out["trials"] and all("fitted" in t for t in out["trials"])


def test_memory_limit_moves_the_result(
    helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, small = probe_json(capsys, helper("build"), "--memory-limit", "32KiB", "--optimizer", "sgd")
    _, large = probe_json(capsys, helper("build"), "--memory-limit", "64KiB", "--optimizer", "sgd")
    assert small["micro_batch"] < large["micro_batch"]


def test_probe_options_reach_the_probe(
    helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = probe_json(
        capsys, helper("with_options"), "--memory-limit", "48KiB", "--max-batch", "20", "--multiple-of", "8"
    )
    assert code == 0
    assert out["micro_batch"] == 16 and out["capped_by"] == "max_batch" and out["multiple_of"] == 8


def test_data_from_its_own_spec(helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = probe_json(capsys, helper("model"), "--data", helper("data"), "--memory-limit", "64KiB")
    assert code == 0 and out["micro_batch"] >= 1


def test_random_inputs_from_input_shape(
    helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = probe_json(
        capsys,
        helper("net"),
        "--input-shape",
        "16",
        "--classes",
        "4",
        "--samples",
        "128",
        "--memory-limit",
        "1MiB",
    )
    assert code == 0
    assert out["micro_batch"] == 128 and out["capped_by"] == "dataset"


def test_min_batch_above_the_result_exits_1(
    helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = probe_json(capsys, helper("build"), "--memory-limit", "64KiB", "--min-batch", "10000")
    assert code == EXIT_BELOW_MIN == 1
    assert out["ok"] is False


def test_min_batch_met_exits_0(helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = probe_json(capsys, helper("build"), "--memory-limit", "64KiB", "--min-batch", "1")
    assert code == 0 and out["ok"] is True


def test_nothing_fits_exits_3(helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out = probe_json(capsys, helper("build"), "--memory-limit", "1KiB")
    assert code == EXIT_NO_FIT == 3
    assert out["ok"] is False and "batch of 1" in out["error"]


@pytest.mark.parametrize(
    ("spec", "extra", "message"),
    [
        ("no_colon", [], "MODULE:ATTR"),
        ("autobatch_no_such_module_here:build", [], "cannot import"),
        ("{module}:missing", [], "no attribute"),
        ("{module}:not_a_model", [], "nn.Module"),
        ("{module}:model", [], "--input-shape"),
        ("{module}:build", ["--memory-limit", "lots"], "memory_limit"),
    ],
    ids=["no-colon", "no-module", "no-attribute", "not-a-model", "no-data", "bad-limit"],
)
def test_bad_usage_exits_2(
    helper: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    spec: str,
    extra: list[str],
    message: str,
) -> None:
    module = helper("x").partition(":")[0]
    code = main(["probe", spec.format(module=module), "--device", "cpu", *extra])
    assert code == EXIT_USAGE == 2
    captured = capsys.readouterr()
    assert "error" in captured.out and message in captured.out.replace("\n", " ")


def test_rich_output(helper: Callable[[str], str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["probe", helper("build"), "--memory-limit", "64KiB", "--device", "cpu", "--min-batch", "10000"]
    )
    assert code == EXIT_BELOW_MIN
    out = capsys.readouterr().out
    assert "autobatch probe" in out and "below --min-batch" in out


def test_python_m_autobatch_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "autobatch", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"autobatch {autobatch.__version__}"


def test_missing_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_demo_one_epoch_json(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(UserWarning, match="BatchNorm"):
        code = main(["demo", "--epochs", "1", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epochs"] == 1
    assert out["plan"]["accumulation_steps"] > 1 and out["plan"]["effective_batch"] == 32
    assert out["probe"]["micro_batch"] < 32
    accuracy = out["evals"][-1]["accuracy"]
    assert 0.0 <= accuracy <= 1.0 and accuracy == out["evals"][-1]["report"]["accuracy"]
    assert out["samples"] == 1347
