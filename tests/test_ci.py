"""Tests for ``.ci/run``: it runs the README's test command, and a failed install fails CI.

The script runs with fakes of the tools it calls (``python``, ``pip``, ``pytest``, ``ruff``, ``mypy``) first
on ``PATH``: each records its command line and exits with the code the test chose, so nothing is installed
or run for real.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "run"
TOOLS = ("python", "pip", "pytest", "ruff", "mypy")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def readme_test_command() -> str:
    """The Quick start's second command: the one that installs the test extras and runs the tests."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the Quick start has a bash block"
    (command,) = [line for line in block.group(1).splitlines() if "pytest" in line]
    return command


def run_ci(tmp_path: Path, **exits: int) -> tuple[int, list[str]]:
    """Run ``.ci/run`` with fake tools; ``exits`` maps a tool to its exit code (0 otherwise).

    Returns the script's exit code and the commands it ran, in order.
    """
    fakes, log = tmp_path / "bin", tmp_path / "commands"
    fakes.mkdir()
    log.touch()
    for tool in TOOLS:
        fake = fakes / tool
        # `python -m venv DIR` makes DIR/bin/python: the same fake, which records as "python" too.
        venv = 'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi\n'
        body = venv if tool == "python" else ""
        fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n{body}exit {exits.get(tool, 0)}\n')
        fake.chmod(0o755)
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        env={"PATH": f"{fakes}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, log.read_text().splitlines()


def test_ci_runs_the_readmes_test_command() -> None:
    command = readme_test_command()
    assert command == "pip install -e '.[test]' && pytest"  # what the README tells a newcomer to run
    lines = SCRIPT.read_text().splitlines()
    assert any(line == command or line.startswith(f"{command} ") for line in lines), lines


def test_a_failed_install_fails_ci(tmp_path: Path) -> None:
    code, commands = run_ci(tmp_path, pip=1)
    assert code == 1
    assert commands[-1] == "pip install -e .[test]" and not any(c.startswith("pytest") for c in commands)


def test_failing_tests_fail_ci_with_pytests_code(tmp_path: Path) -> None:
    code, commands = run_ci(tmp_path, pytest=3)
    assert code == 3 and commands[-1] == "pytest "


def test_a_clean_run_runs_every_step(tmp_path: Path) -> None:
    code, commands = run_ci(tmp_path)
    assert code == 0
    assert "pip install -e .[test]" in commands and "pytest " in commands  # the README's command
    assert commands.index("pytest ") == commands.index("pip install -e .[test]") + 1
    assert {"ruff", "mypy"} <= {c.split()[0] for c in commands}, commands


def test_the_integrations_are_tested_with_the_extras_and_with_their_oldest_versions(tmp_path: Path) -> None:
    code, commands = run_ci(tmp_path)
    assert code == 0
    extras = commands.index("python -m pip install --quiet -e .[hf,lightning]")
    assert commands.index("python -m pip install --quiet torch==2.13.0") < extras < commands.index("pytest ")
    oldest = [c for c in commands if "transformers==" in c]
    assert oldest == [
        "python -m pip install --quiet -e .[test,hf,lightning] transformers==4.46.3 accelerate==1.1.0 "
        "lightning==2.4.0"
    ]
    venv = commands.index(next(c for c in commands if c.startswith("python -m venv ")))
    torch_first = commands.index("python -m pip install --quiet torch==2.13.0", venv)
    assert venv < torch_first < commands.index(oldest[0])  # no extra pulls another torch there either
    assert commands[-4] == "python -m pytest -q -p no:cacheprovider tests/integrations"
