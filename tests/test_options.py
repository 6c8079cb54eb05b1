"""Tests for autobatch.options: one definition of every option, reaching every entry point and the docs."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import autobatch
from autobatch.options import (
    COLUMNS,
    ENTRY_POINTS,
    GROUPS,
    PROBE_ONLY,
    Options,
    entry_fields,
    markdown_table,
    spec_of,
)

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = {
    "fit": "autobatch:fit",
    "probe": "autobatch:probe",
    "try_batch": "autobatch:try_batch",
    "TrainStep": "autobatch:TrainStep",
    "predict": "autobatch:predict",
    "AutoBatchTrainer": "autobatch.integrations.transformers:AutoBatchTrainer",
    "AutoBatch": "autobatch.integrations.lightning:AutoBatch",
}
FRAMEWORK = {"AutoBatchTrainer": "transformers", "AutoBatch": "lightning"}


def entry(name: str) -> Any:
    """The entry point called ``name``; an integration's test is skipped where its framework is missing."""
    if name in FRAMEWORK:
        pytest.importorskip(FRAMEWORK[name])
    module, _, attr = ENTRIES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def own_parameters(name: str) -> set[str]:
    if name == "AutoBatchTrainer":  # the Trainer's own, then target_batch
        from transformers import Trainer

        trainer = inspect.signature(Trainer).parameters.values()
        return {p.name for p in trainer if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} | {"target_batch"}
    return {
        "fit": {"model", "data"},
        "probe": {"model", "data"},
        "try_batch": {"model", "data", "batch_size", "steps"},
        "TrainStep": {"model", "optimizer"},
        "predict": {"model", "data"},
        "AutoBatch": {"target_batch", "batch_arg_name"},
    }[name]


def test_every_entry_point_is_listed_here_and_has_a_column() -> None:
    assert set(ENTRIES) == set(ENTRY_POINTS) == set(COLUMNS)


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_each_entry_point_s_signature_lists_its_options_with_their_defaults(name: str) -> None:
    signature = inspect.signature(entry(name))
    for f in entry_fields(name):
        parameter = signature.parameters[f.name]
        assert parameter.default == f.default, f.name
    assert set(signature.parameters) == own_parameters(name) | {f.name for f in entry_fields(name)}
    assert not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_each_entry_point_s_docstring_documents_every_option(name: str) -> None:
    target = entry(name)
    doc = inspect.getdoc(target.__init__ if isinstance(target, type) else target) or ""
    assert "Options (keyword only):" in doc
    for f in entry_fields(name):
        if f.name != "target_batch":  # fit's positional argument, documented in Args
            assert f"{f.name}: {spec_of(f).help}." in doc, f.name


def test_every_option_has_a_check_help_and_a_default_that_passes_its_check() -> None:
    for group in GROUPS.values():
        group()  # every default passes its own check
        for f in dataclasses.fields(group):
            spec = spec_of(f)
            assert spec.help and not spec.help[0].isupper() and not spec.help.endswith("."), f.name


def test_an_unknown_option_names_the_nearest_known_one() -> None:
    with pytest.raises(
        TypeError, match=r"fit\(\) got an unexpected keyword argument `epoch`. Did you mean `epochs`\?"
    ):
        Options.parse("fit", {"epoch": 3})
    with pytest.raises(
        TypeError, match=r"probe\(\) got an unexpected keyword argument `zzz`. Known options:"
    ):
        Options.parse("probe", {"zzz": 1})
    with pytest.raises(TypeError, match=r"try_batch\(\) got an unexpected keyword argument `margin`"):
        Options.parse("try_batch", {"margin": 0.1})


def test_options_are_frozen_and_record_what_was_given() -> None:
    options = Options.parse("fit", {"margin": 0.25, "memory_limit": "2KiB"})
    assert options.given == {"margin", "memory_limit"}
    assert options.probe.margin == 0.25 and options.memory.memory_limit == 2048  # normalised once
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.probe.margin = 0.5  # type: ignore[misc]


def test_probe_only_options_are_the_probe_and_cache_groups() -> None:
    names = {f.name for f in dataclasses.fields(GROUPS["probe"])} | {"cache", "cache_dir"}
    assert names == PROBE_ONLY


def test_the_readme_options_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    assert markdown_table() in readme, "regenerate it: python -m autobatch.options"


def test_importing_autobatch_imports_neither_torch_nor_sklearn_until_used() -> None:
    code = (
        "import sys, autobatch; bare = {m for m in ('torch', 'sklearn') if m in sys.modules}; "
        "autobatch.fit, autobatch.probe, autobatch.plan, autobatch.ProbeResult; "
        "print(sorted(bare), 'torch' in sys.modules, 'sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "False"]  # sklearn only when a report is scored


def test_no_public_function_shadows_a_module() -> None:
    for name in autobatch.__all__:
        value = getattr(autobatch, name)
        assert not inspect.ismodule(value), name
    planner = importlib.import_module("autobatch.planner")
    assert callable(autobatch.plan) and planner.uniform_plan(12, 32).chunks == (8, 8, 8, 8)
    assert autobatch.plan is planner.plan  # the package attribute is the function, the module is planner
