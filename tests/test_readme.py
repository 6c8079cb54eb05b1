"""The README's code blocks run as written and show what they print, so that they cannot drift.

Each python block runs in a namespace holding what the README leaves to the reader (a tiny model, its data,
an optimizer), on the CPU at small sizes; a comment that says what an expression gives is checked against
its value. Each command runs, and the output the README shows after it is compared with the real one
(times excepted). Checked elsewhere: "With the Hugging Face Trainer" and "With Lightning"
(``tests/integrations/test_readme.py``), "Will it fit on …?" (``tests/probing/test_prediction.py``), the
Quick start's test command (``tests/test_ci.py``), the demo's order (``tests/cli/test_demo.py``) and the
options table (``tests/test_options.py``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import autobatch
from autobatch.result import ProbeResult

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    """The README's section headed ``title`` (``## …`` or ``### …``), up to the next heading of any level."""
    lines, fenced, found = [], False, False
    for line in README.splitlines():
        if line.startswith("#") and not fenced:
            if found:
                break
            found = line.lstrip("#") == f" {title}"
        elif found:
            lines.append(line)
        fenced ^= line.startswith("```")
    assert found, f"the README has a section {title!r}"
    return "\n".join(lines) + "\n"


def fenced(text: str, lang: str) -> list[str]:
    """The fenced blocks of one language (``""`` for plain ones) in ``text``, in order."""
    found: list[str] = []
    lines: list[str] = []
    opened: str | None = None
    for line in text.splitlines(keepends=True):
        if opened is None and line.startswith("```"):
            opened, lines = line[3:].strip(), []
        elif opened is not None and line.startswith("```"):
            if opened == lang:
                found.append("".join(lines))
            opened = None
        elif opened is not None:
            lines.append(line)
    return found


def blocks(title: str, lang: str = "python") -> list[str]:
    """The fenced blocks of one language (``""`` for plain ones) in a section, in order."""
    return fenced(section(title), lang)


def run(code: str, namespace: dict[str, Any], name: str) -> list[tuple[str, Any]]:
    """Exec ``code`` in ``namespace``; returns each top-level expression statement's first line and value."""
    tree = ast.parse(code)
    values: list[tuple[str, Any]] = []
    lines = code.splitlines()
    namespace["_readme_record"] = lambda line, value: values.append((lines[line - 1], value))
    for i, node in enumerate(tree.body):
        if isinstance(node, ast.Expr):
            record = ast.Call(
                ast.Name("_readme_record", ast.Load()), [ast.Constant(node.lineno), node.value], []
            )
            tree.body[i] = ast.copy_location(ast.Expr(record), node)
    ast.fix_missing_locations(tree)
    exec(compile(tree, f"README.md ({name})", "exec"), namespace)
    return values


def value_of(values: list[tuple[str, Any]], start: str) -> tuple[Any, str]:
    """The value of the expression whose line starts with ``start``, and that line's comment."""
    (found,) = [(value, line.partition("  # ")[2]) for line, value in values if line.startswith(start)]
    return found


def tiny_classifier(features: int = 8, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 16), nn.ReLU(), nn.Linear(16, classes))


def tensors(n: int, features: int = 8, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probes measure: no entry of the user's cache answers for them, none is left behind."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)


def cli_env(tmp_path: Path) -> dict[str, str]:
    """This checkout's autobatch, its own cache, no colours: what a user sees piped."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PYTORCH_CUDA_ALLOC_CONF")}
    return {**env, "PYTHONPATH": str(ROOT), "AUTOBATCH_CACHE_DIR": str(tmp_path / "cache"), "NO_COLOR": "1"}


def autobatch_command(line: str) -> list[str]:
    """A README command line (``autobatch …``, its ``#`` comment and redirection dropped) for this Python."""
    words = shlex.split(line, comments=True)
    assert words[0] == "autobatch", line
    if ">" in words:
        words = words[: words.index(">")]
    return [sys.executable, "-m", "autobatch", *words[1:]]


# -- the opening lines ----------------------------------------------------------------------------------


def test_the_opening_fit_trains_at_the_target_batch_and_scores_the_held_out_data() -> None:
    """``fit(model, (X, y), target_batch=32, eval_data=…)``: steps of exactly 32, a classification report."""
    (code,) = fenced(README.split("\n## ", 1)[0], "python")
    X, y = tensors(96)
    X_test, y_test = tensors(30, seed=1)
    namespace: dict[str, Any] = {
        "model": tiny_classifier(),
        "X": X,
        "y": y,
        "X_test": X_test,
        "y_test": y_test,
    }
    run(code, namespace, "the opening")
    result = namespace["result"]
    assert result.plan.effective_batch == 32 and result.samples == 96 and result.optimizer_steps == 3
    assert result.report.kind == "classification" and "f1-score" in result.report.text


# -- fit, probe and try_batch ---------------------------------------------------------------------------


def test_fit_probe_and_try_batch_run_as_written_and_give_what_the_comments_say() -> None:
    """The block runs; ``try_batch(…).fitted`` is a yes; the plan's comment is what ``describe()`` gives."""
    (code,) = blocks("`fit`, `probe` and `try_batch`")
    model = tiny_classifier()
    namespace: dict[str, Any] = {
        "torch": torch,
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters()),
        "train_data": tensors(320),
        "test_data": tensors(60, seed=1),
        "class_names": ["cat", "dog", "fox"],
    }
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        values = run(code, namespace, "fit, probe and try_batch")
    probe = namespace["probe"]
    assert printed.getvalue().split()[0] == str(probe.micro_batch)
    fitted, _ = value_of(values, "autobatch.try_batch(")
    assert fitted is True
    described, comment = value_of(values, "autobatch.plan(probe.micro_batch, target_batch=256)")
    assert described == autobatch.plan(probe.micro_batch, target_batch=256).describe()
    said = re.fullmatch(r"for (\d+): '(.*)'", comment)
    assert said is not None, comment
    assert autobatch.plan(int(said[1]), target_batch=256).describe() == said[2]
    report, comment = value_of(values, "result.report.text")
    assert "classification report" in comment and "f1-score" in report
    assert all(name in report for name in namespace["class_names"])
    backoffs, comment = value_of(values, "result.backoffs")
    assert comment.startswith("OOM back-offs") and backoffs == []
    result = namespace["result"]
    assert result.epochs == 3 and result.plan.effective_batch == 256


# -- Your own loop --------------------------------------------------------------------------------------


def loop_namespace(monkeypatch: pytest.MonkeyPatch, samples: int) -> dict[str, Any]:
    """What the loop blocks use, on the CPU: ``.cuda()`` keeps a tensor where it is."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    model = tiny_classifier()
    return {
        "torch": torch,
        "autobatch": autobatch,
        "model": model,
        "optimizer": torch.optim.AdamW(model.parameters()),
        "criterion": nn.CrossEntropyLoss(),
        "train_set": TensorDataset(*tensors(samples)),
        "DataLoader": DataLoader,
    }


def test_the_hand_written_loop_runs_as_written(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop autobatch replaces: 16 + 16 = 32 samples an optimizer step."""
    hand, _ = blocks("Your own loop")
    namespace = loop_namespace(monkeypatch, 96)
    steps: list[int] = []
    namespace["optimizer"].register_step_post_hook(lambda *_: steps.append(1))
    namespace["tqdm"] = lambda iterable: iterable
    with warnings.catch_warnings():  # without CUDA, torch says that autocast and the GradScaler are off
        warnings.simplefilter("ignore", UserWarning)
        run(hand, namespace, "the hand-written loop")
    assert len(steps) == 96 // 32


def test_trainstep_takes_one_optimizer_step_over_exactly_each_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call is one optimizer step over exactly the batch it is given, the short last one too."""
    _, code = blocks("Your own loop")
    namespace = loop_namespace(monkeypatch, 80)
    reports: list[tuple[int, Any]] = []

    def tqdm(loader: DataLoader) -> Iterator[Any]:
        for batch in loader:
            yield batch
            reports.append((len(batch[1]), namespace["loss"]))  # the loop's body has run on this batch

    namespace["tqdm"] = tqdm
    run(code, namespace, "TrainStep")
    batch = re.search(r"batch_size=(\d+)", code)
    assert batch is not None and f"over exactly these {batch[1]} samples" in code
    assert [size for size, _ in reports] == [int(batch[1])] * 2 + [80 - 2 * int(batch[1])]
    for size, report in reports:
        assert sum(report.micro_batches) == size and report.applied and math.isfinite(float(report))


def test_the_exports_table_is_what_to_config_returns() -> None:
    """The table's settings for 11 probed, target 32, bf16 and AdamW, and its notes, tool by tool."""
    text = section("Your own loop")
    header = re.search(r"^\| tool \| settings for (\d+) probed, target (\d+), (\w+), (\w+) \|", text, re.M)
    assert header is not None
    micro, target, precision, optimizer = int(header[1]), int(header[2]), header[3], header[4]
    probed = ProbeResult(
        micro, micro, micro + 1, None, "cuda:0", precision, None, "none", optimizer=optimizer
    )
    rows = re.findall(r"^\| `(\w+)`[^|]*\|\s*(.*?)\s*\|\s*(.*?)\s*\|$", text, re.M)
    assert [tool for tool, _, _ in rows] == ["hf", "lightning", "deepspeed", "accelerate"]
    for tool, settings, notes in rows:
        config = probed.to_config(tool, target)
        assert shown_settings(settings) == config.settings, tool
        sizes = autobatch.plan(micro, target).to_config(tool).settings  # Plan.to_config: the same numbers
        assert sizes.items() <= config.settings.items(), tool
        said = re.sub(r"`([^`]*)`", r"\1", notes)
        elsewhere = re.fullmatch(r"use (\w+) in (.+)", said)
        if elsewhere:  # "measured with AdamW: use it in configure_optimizers (…)"
            expected = [f"measured with {elsewhere[1]}: use it in", elsewhere[2]]
            assert any(all(part in note for part in expected) for note in config.notes), (tool, config.notes)
        elif said:
            assert any(said in note for note in config.notes), (tool, config.notes)


def shown_settings(cell: str) -> dict[str, Any]:
    """A table cell's settings: ``k=v`` and ``Accelerator(k=v, …)``, values in Python or JSON."""
    settings: dict[str, Any] = {}
    for span in re.findall(r"`([^`]*)`", cell):
        call = re.fullmatch(r"\w+\((.*)\)", span)
        source_call = f"f({call[1] if call else span})"
        parsed = ast.parse(source_call, mode="eval").body
        assert isinstance(parsed, ast.Call)
        for keyword in parsed.keywords:
            source = ast.get_source_segment(source_call, keyword.value)
            assert keyword.arg is not None and source is not None
            settings[keyword.arg] = json.loads(source) if source[0] in '{"' else ast.literal_eval(source)
    return settings


# -- Text and language models ---------------------------------------------------------------------------


def test_the_language_model_block_runs_and_scores_a_causal_lm() -> None:
    """With a tiny GPT-2 and an in-memory tokenizer (nothing downloaded): a causal LM's report."""
    pytest.importorskip("transformers")
    from tests import hf_fixtures

    (code,) = blocks("Text and language models")
    namespace: dict[str, Any] = {
        "autobatch": autobatch,
        "DataLoader": DataLoader,
        "tokenizer": hf_fixtures.tokenizer(),
        "gpt2": hf_fixtures.gpt2_lm(),
        "train_texts": hf_fixtures.lm_samples(64),
        "val_texts": hf_fixtures.lm_samples(32, seed=1),
    }
    values = run(code, namespace, "Text and language models")
    (kind, perplexity, accuracy), comment = value_of(values, "result.report.kind")
    said_kind, said_perplexity, said_accuracy = ast.literal_eval(comment)
    assert kind == said_kind == "causal_lm"  # the figures are an example: they depend on the training
    assert 1 < perplexity < hf_fixtures.VOCAB_SIZE * 2 and 0 <= accuracy <= 1
    assert isinstance(said_perplexity, float) and 0 <= said_accuracy <= 1
    assert namespace["result"].plan.effective_batch == 32


# -- What "fits" means and the command line ---------------------------------------------------------------


def test_what_fits_means_shows_the_probes_survival_notes_for_the_setup_it_names() -> None:
    """The MLP 512-1024-1024-10 with AdamW in bf16 under 48 MiB of the emulated caching allocator."""
    text = section('What "fits" means: training that survives')
    assert (
        "an MLP\n512-1024-1024-10 with AdamW in bf16, under 48 MiB of the emulated caching allocator" in text
    )
    (shown,) = blocks('What "fits" means: training that survives', "")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    probed = autobatch.probe(
        model,
        tensors(2048, features=512, classes=10),
        optimizer=torch.optim.AdamW(model.parameters()),
        memory_limit="48MiB",
        emulation="allocator",
        precision="bf16",
        cache=False,
    )
    assert probed.survival_notes() == shown.splitlines()


def without_times(output: str) -> list[str]:
    """The lines of a probe's output, the trials' seconds (the table's last column) made ``t``."""
    return [re.sub(r"\d+\.\d+(\s*│)$", r"t\1", line.rstrip()) for line in output.splitlines()]


def test_the_command_line_probe_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """The section's first command prints the block after it, line for line (times aside)."""
    (commands,) = blocks("Command line", "bash")
    (shown,) = blocks("Command line", "")
    first = commands.splitlines()[0]
    done = subprocess.run(
        autobatch_command(first), cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_times(done.stdout) == without_times(shown)


def test_the_format_command_prints_the_equal_split_the_readme_gives(tmp_path: Path) -> None:
    """``--format deepspeed``: 11 → 8 for 32 = 8 × 4, as the section says."""
    (commands,) = blocks("Command line", "bash")
    (line,) = [line for line in commands.splitlines() if "--format deepspeed" in line]
    done = subprocess.run(
        autobatch_command(line), cwd=ROOT, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(11 → 8 for 32 = 8 × 4)" in section("Command line")
    settings = json.loads(done.stdout)
    assert settings["train_micro_batch_size_per_gpu"] == 8 and settings["gradient_accumulation_steps"] == 4


def test_the_examples_the_bash_blocks_name_exist() -> None:
    """Every ``examples/….py`` a command names is in the checkout (the commands run from its root)."""
    named = {path for block in fenced(README, "bash") for path in re.findall(r"examples/[\w/]+\.py", block)}
    assert named and all((ROOT / path).is_file() for path in named), named


# -- CI smoke tests -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_ci_smoke_tests_pass_fail_and_skip_as_the_readme_shows(tmp_path: Path) -> None:
    """The block is a test file: it runs with the plugin, and fails and skips with the lines shown."""
    (code,) = blocks("CI smoke tests")
    (shown,) = blocks("CI smoke tests", "")
    failure, skipped = shown.splitlines()
    (tmp_path / "test_memory.py").write_text(code)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-v", "test_memory.py"],
        cwd=tmp_path,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = done.stdout.splitlines()
    assert done.returncode == 1, done.stdout[-3000:]
    outcomes = dict(re.findall(r"^test_memory\.py::(\w+) (PASSED|FAILED|SKIPPED)", done.stdout, re.M))
    gpu = "PASSED" if torch.cuda.is_available() else "SKIPPED"
    assert outcomes == {
        "test_batch_256_fits": "PASSED",
        "test_short_fit_trains": "PASSED",
        "test_too_small": "FAILED",
        "test_batch_4096_fits_a_t4": "PASSED",
        "test_on_the_gpu": gpu,
    }, done.stdout[-3000:]
    assert failure in out, done.stdout[-3000:]
    assert skipped in out or gpu == "PASSED", done.stdout[-3000:]


@pytest.mark.slow
def test_the_ci_probe_gate_exits_0_with_one_json_object(tmp_path: Path) -> None:
    """``autobatch probe examples/ci/model.py:build … --json > probe.json`` as it stands in a checkout."""
    (command,) = blocks("CI smoke tests", "bash")
    assert command.strip().endswith("--json > probe.json")
    done = subprocess.run(
        autobatch_command(command.strip()),
        cwd=ROOT,
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["ok"] is True and result["min_batch"] == 16 and result["micro_batch"] >= 16
