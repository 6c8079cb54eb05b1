"""Fixtures for every test under the repository: the suite, the docstring examples and examples/ci."""

from __future__ import annotations

import importlib.util

import pytest

# The integrations import their framework at the top: their docstring examples are collected only where it
# is installed (pip install -e '.[hf]' or '.[lightning]').
_FRAMEWORK_OF = {
    "autobatch/integrations/transformers.py": ("transformers", "accelerate"),
    "autobatch/integrations/_hf.py": ("transformers",),
    "autobatch/integrations/lightning.py": ("lightning",),
}
collect_ignore = [
    path
    for path, needs in _FRAMEWORK_OF.items()
    if any(importlib.util.find_spec(name) is None for name in needs)
]


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty probe cache: a result cached by one test (or by the user's own runs) must
    not answer another's probe, and a test run never writes to the user's cache directory."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path_factory.mktemp("probe-cache")))
