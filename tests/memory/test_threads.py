"""Tests for autobatch.memory.threads: one CPU thread for autobatch's work, unless the user chose a count."""

from __future__ import annotations

import pytest
import torch

from autobatch.memory import threads
from autobatch.memory.threads import chosen_by_user, cpu_threads

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


def test_available_cores_is_what_this_process_may_run_on() -> None:
    import os

    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert threads.available_cores() == expected >= 1


@pytest.mark.parametrize("extra", [1, 1000], ids=["one-more", "a-thousand"])
def test_more_threads_than_cores_are_refused_before_anything_runs(extra: int) -> None:
    """A thousand threads raised MemoryError under an address-space limit; refused now, naming the cores."""
    import autobatch
    from autobatch.errors import UsageValueError

    cores = threads.available_cores()
    model = torch.nn.Linear(4, 2)
    before = (torch.get_num_threads(), model.weight.detach().clone())
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    for value in (cores + extra, str(cores + extra)):  # from Python, and as the command line passes it
        with pytest.raises(UsageValueError) as caught:
            autobatch.fit(model, data, target_batch=4, cpu_threads=value, device="cpu", progress=False)
        message = str(caught.value)
        assert "`cpu_threads`" in message and f"got {cores + extra}" in message
        assert f"at most the {cores} CPU core" in message
    assert torch.get_num_threads() == before[0] and torch.equal(model.weight, before[1])


def test_as_many_threads_as_cores_are_taken() -> None:
    from autobatch.options import MemoryOptions

    cores = threads.available_cores()
    assert MemoryOptions(cpu_threads=cores).cpu_threads == cores
    assert MemoryOptions(cpu_threads=str(cores)).cpu_threads == cores
