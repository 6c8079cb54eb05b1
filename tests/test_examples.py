"""The examples run as a user runs them: ``python examples/NAME.py`` in a fresh process, default settings.

Each must finish, train without an out-of-memory back-off where its probe chose the micro-batch (the probe
measured what training runs), and print what its docstring promises. They start together in the module's
first test (each runs on one CPU thread, so two cores take them two at a time) and each test waits for its
own. ``examples/ddp.py`` runs under torchrun in ``tests/test_distributed.py``; the demo in
``tests/cli/test_demo.py``.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300

EXAMPLES = {
    "quickstart": ["accuracy", "macro avg"],
    "custom_step": ["dict batches:", "step_fn:"],
    "token_level": ["token accuracy"],
    "hf_text": ["BERT", "GPT-2 causal LM", "perplexity by epoch", "next-token accuracy"],
}
NEEDS_TRANSFORMERS = {"hf_text"}


def _runnable(name: str) -> bool:
    return name not in NEEDS_TRANSFORMERS or importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory, user_env: dict[str, str]
) -> Iterator[dict[str, subprocess.Popen[str]]]:
    env = user_env | {"AUTOBATCH_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}  # a first run: no cache
    started = {
        name: subprocess.Popen(
            [sys.executable, str(ROOT / "examples" / f"{name}.py")],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in EXAMPLES
        if _runnable(name)
    }
    yield started
    for process in started.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_runs_without_backing_off(name: str, runs: dict[str, subprocess.Popen[str]]) -> None:
    if name not in runs:
        pytest.skip("needs transformers (pip install -e '.[hf]')")
    try:
        output, _ = runs[name].communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        runs[name].kill()
        pytest.fail(f"examples/{name}.py did not finish in {TIMEOUT} s")
    assert runs[name].returncode == 0, output[-3000:]
    assert "out of memory at micro-batch" not in output, output[-3000:]
    for expected in EXAMPLES[name]:
        assert expected in output, f"{expected!r} not in the output of examples/{name}.py:\n{output[-3000:]}"
