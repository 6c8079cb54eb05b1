"""Shared fixtures: tiny models from :mod:`tests.models`, and a fast, quiet CPU for the whole session."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

from tests.models import Case, cnn_case, mlp_case, transformer_case

# The models are tiny: one intra-op thread is faster than two, and far faster on a shared 2-core CI
# machine where OpenMP threads spin against other processes.
torch.set_num_threads(1)

# Timing is not what the property tests check: on a loaded 2-core CI machine a fast example can take
# longer than hypothesis' default 200 ms deadline and fail for no reason.
settings.register_profile("autobatch", deadline=None)
settings.load_profile("autobatch")


@pytest.fixture(scope="session", autouse=True)
def _frozen_heap() -> Iterator[None]:
    """Warm up torch's lazy imports, then freeze the heap for the session.

    The probe calls ``gc.collect()`` after every out-of-memory and at the end of every probe; with torch
    loaded a full collection walks a few hundred thousand objects (0.1-0.2 s). Frozen objects are
    skipped, so collections in the tests only walk what the tests create.
    """
    from autobatch import try_batch

    model = torch.nn.Linear(4, 2)
    data = (torch.randn(4, 4), torch.randint(0, 2, (4,)))
    for precision in ("fp32", "bf16"):
        try_batch(model, data, 2, memory_limit="1MiB", precision=precision)
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session")
def user_env() -> dict[str, str]:
    """The environment a user runs autobatch in: this one without thread pinning (a CI job may set it)."""
    return {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


@pytest.fixture
def mlp() -> Case:
    """An MLP on 256 vectors ``(X, y)``."""
    return mlp_case()


@pytest.fixture
def cnn() -> Case:
    """A CNN with BatchNorm and Dropout on 256 images ``(X, y)``."""
    return cnn_case()


@pytest.fixture
def transformer() -> Case:
    """A Transformer classifier on 200 variable-length sequences, as a padding DataLoader."""
    return transformer_case()
