"""Tests for autobatch.threads: one CPU thread for autobatch's work, unless the user chose a count."""

from __future__ import annotations

import pytest
import torch

from autobatch import threads
from autobatch.threads import chosen_by_user, cpu_threads

CPU = torch.device("cpu")


@pytest.fixture
def torch_default(monkeypatch: pytest.MonkeyPatch) -> int:
    """Threads at torch's own default, with no environment variable: what a newcomer has."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    default = max(threads._default_counts())
    torch.set_num_threads(default)
    yield default
    torch.set_num_threads(previous)


def test_auto_is_one_thread_at_torchs_default_and_restores_it(torch_default: int) -> None:
    assert not chosen_by_user()
    with cpu_threads("auto", CPU) as count:
        assert count == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == torch_default


def test_a_count_set_in_the_environment_is_kept(torch_default: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch_default))
    assert chosen_by_user()
    with cpu_threads("auto", CPU) as count:
        assert count == torch_default == torch.get_num_threads()


def test_a_count_set_with_torch_is_kept(torch_default: int) -> None:
    chosen = torch_default + 3  # not a count torch picks by itself on this machine
    torch.set_num_threads(chosen)
    with cpu_threads("auto", CPU) as count:
        assert count == chosen


def test_an_explicit_count_wins_and_other_devices_are_left_alone(torch_default: int) -> None:
    with cpu_threads(3, CPU) as count:
        assert count == 3 == torch.get_num_threads()
    assert torch.get_num_threads() == torch_default
    with cpu_threads("auto", torch.device("meta")) as count:
        assert count is None and torch.get_num_threads() == torch_default
