"""Tests for autobatch.training.progress: the training progress bar shows the micro-batches that run, and
draws in a terminal that reports no size."""

from __future__ import annotations

import pytest
import torch

from autobatch.step.stepper import Stepper
from autobatch.training.loop import TrainLoop
from tests.training.test_loop import classification_data, mlp, session_for

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("micro", "target", "label"), [(19, 64, "16×4=64"), (12, 32, "11+11+10=32")], ids=["even", "uneven"]
)
def test_the_progress_bar_shows_the_micro_batches_that_run(
    micro: int, target: int, label: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"optimizer": optimizer, "target_batch": target, "micro_batch": micro, "progress": True}
    session = session_for(model, classification_data(2 * target), **options)
    loop = TrainLoop(session, Stepper(model, optimizer, session.memory, "fp32"), micro)

    loop.run_epoch(0, 1)

    bar = capsys.readouterr().err
    assert f"batch={label}," in bar and f"={micro}×" not in bar


def run_in_a_terminal(code: str, rows: int, columns: int) -> str:
    """What ``python -c code`` writes to a pseudo-terminal whose window is ``rows × columns``."""
    import fcntl
    import os
    import pty
    import select
    import struct
    import subprocess
    import sys
    import termios
    from pathlib import Path

    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=terminal, stdout=terminal, stderr=terminal, env=env
    )
    os.close(terminal)
    out = b""
    try:
        while select.select([controller], [], [], 120)[0]:
            chunk = os.read(controller, 4096)  # raises OSError once the child has closed the terminal
            if not chunk:
                break
            out += chunk
    except OSError:
        pass
    finally:
        os.close(controller)
        process.wait(timeout=60)
    return out.decode()


@pytest.mark.parametrize(("rows", "columns"), [(0, 0), (24, 100)], ids=["unsized", "sized"])
def test_the_progress_bar_draws_in_a_terminal_that_reports_no_size(rows: int, columns: int) -> None:
    code = (
        "import torch, autobatch\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(6, 3)\n"
        "data = torch.randn(64, 6), torch.randint(0, 3, (64,))\n"
        "autobatch.fit(model, data, target_batch=32, micro_batch=12, epochs=2, device='cpu', "
        "precision='fp32', seed=0, cpu_threads=1)\n"
        "print('done')\n"
    )
    out = run_in_a_terminal(code, rows, columns)
    lines = [line.split("\r")[-1] for line in out.split("\r\n")]
    assert lines[-2:] == ["done", ""], out
    assert [line.split(":")[0] for line in lines[:-2]] == ["epoch 1/2", "epoch 2/2"], out
    assert all("batch=11+11+10=32" in line for line in lines[:-2]), out
