"""Fixtures for every test under the repository: the suite, the docstring examples and examples/ci."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty probe cache: a result cached by one test (or by the user's own runs) must
    not answer another's probe, and a test run never writes to the user's cache directory."""
    monkeypatch.setenv("AUTOBATCH_CACHE_DIR", str(tmp_path_factory.mktemp("probe-cache")))
