"""The README's sections "With the Hugging Face Trainer" and "With Lightning" run as written: their code
blocks, in order, in one namespace (the Lightning block reuses the first one's config, data and collate)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

README = Path(__file__).resolve().parents[2] / "README.md"


def blocks(section: str) -> list[str]:
    """The python code blocks of the README's ``### section``."""
    text = README.read_text().split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.slow
def test_the_trainer_sections_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    (hf,) = blocks("With the Hugging Face Trainer")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(hf, "README.md (With the Hugging Face Trainer)", "exec"), namespace)
    assert "64 samples a step, in micro-batches of (" in out.getvalue()
    assert namespace["trainer"].state.global_step == 2  # type: ignore[attr-defined]
    pytest.importorskip("lightning")
    (lightning,) = blocks("With Lightning")
    with contextlib.redirect_stdout(out):
        exec(compile(lightning, "README.md (With Lightning)", "exec"), namespace)
    assert re.search(r"\d+ × \d+ accumulated = 64 a step", out.getvalue())
