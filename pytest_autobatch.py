"""autobatch's pytest plugin (entry point ``pytest11``): small-device markers for CI smoke tests.

Installing autobatch enables it (``-p no:autobatch`` turns it off). It adds:

* ``@pytest.mark.memory_limit("4GiB")``: the test runs as on a device of that size. Every probe, fit,
  try_batch, assert_fits and assert_trains in it that passes no ``memory_limit`` uses the limit (the CPU
  emulates a device of that size); on a CUDA machine the caching allocator of the current device is also
  capped to it for the whole test. Both are restored after the test, failed or not.
* ``@pytest.mark.memory_limit(gpu="T4")``: the same, as on that card: the limit is what its caching
  allocator may reserve (its memory less the CUDA context; a limit given too caps it further).
* ``predict=True`` in either: ``assert_fits`` predicts (:func:`autobatch.predict`, for the card's kernels
  with ``gpu=``) instead of running the steps, so a CPU-only runner checks a realistic model against a
  real card in seconds.
* the ``memory_limit`` fixture: the marked test's :class:`~autobatch.testing.DeviceLimit`.
* ``@pytest.mark.gpu``: the test is skipped where CUDA is not available.

Loading the plugin costs nothing: pytest loads it in every run of every project in an environment where
autobatch is installed, so it lives outside the ``autobatch`` package (importing that imports torch) and
imports torch and autobatch only when a test asks for a limit or a GPU. The assertions themselves live
in :mod:`autobatch.testing`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from autobatch.testing import DeviceLimit

__all__ = ["memory_limit", "pytest_collection_modifyitems", "pytest_configure"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``memory_limit`` and ``gpu`` markers."""
    config.addinivalue_line(
        "markers",
        "memory_limit(limit, *, gpu=None, predict=False): run the test as on a device of `limit` (bytes or "
        "e.g. '4GiB') or as on the card `gpu` ('T4', 'A100-80GB', ...): the CUDA allocator capped on a GPU, "
        "autobatch's emulated device on the CPU; predict=True: assert_fits predicts (autobatch.testing)",
    )
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (autobatch.testing)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests where CUDA is not available."""
    marked = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not marked:
        return
    import torch

    if not torch.cuda.is_available():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def _given(marker: pytest.Mark) -> str:
    return ", ".join([*map(repr, marker.args), *(f"{k}={v!r}" for k, v in marker.kwargs.items())])


def _marker_device(marker: pytest.Mark) -> tuple[int, str | None, bool]:
    """The marker's limit in bytes, its card (``None``: none) and whether assertions predict."""
    kwargs = dict(marker.kwargs)
    predict, gpu = kwargs.pop("predict", False), kwargs.pop("gpu", None)
    values = [*marker.args, *kwargs.values()]
    if (
        set(kwargs) - {"limit"}
        or len(values) > 1
        or (gpu is None and (len(values) != 1 or values[0] is None))
    ):
        pytest.fail(
            "Expected `@pytest.mark.memory_limit` to take one limit, e.g. @pytest.mark.memory_limit('4GiB'), "
            f"or a card, e.g. @pytest.mark.memory_limit(gpu='T4'), but got memory_limit({_given(marker)}).",
            pytrace=False,
        )
    if not isinstance(predict, bool):
        pytest.fail(
            f"Expected `predict` of `@pytest.mark.memory_limit` to be True or False, but got {predict!r}.",
            pytrace=False,
        )
    from autobatch.memory.cards import card
    from autobatch.units import parse_memory_limit

    try:
        nbytes = parse_memory_limit(values[0], name="@pytest.mark.memory_limit") if values else None
        found = card(gpu) if gpu is not None else None
    except (TypeError, ValueError) as exc:
        pytest.fail(str(exc), pytrace=False)
    if found is not None:
        nbytes = found.budget if nbytes is None else min(nbytes, found.budget)
    assert nbytes is not None  # a limit, or a card's budget
    return nbytes, found.name if found is not None else None, predict


@pytest.fixture(autouse=True)
def _autobatch_memory_limit(request: pytest.FixtureRequest) -> Iterator[DeviceLimit | None]:
    """Run a ``memory_limit``-marked test inside the limit; the limit is undone at teardown."""
    marker = request.node.get_closest_marker("memory_limit")
    if marker is None:
        yield None
        return
    limit, gpu, predict = _marker_device(marker)

    from autobatch.memory.device import DeviceMemory, memory_limit_scope
    from autobatch.session import check_device_available, default_device
    from autobatch.testing import DeviceLimit, device_scope

    # On CUDA the whole test body runs under the allocator cap (restored after, as DeviceMemory does).
    device = check_device_available(default_device(), "default")
    scoped = DeviceLimit.on(limit, device, gpu=gpu, predict=predict)
    with contextlib.ExitStack() as stack:
        stack.enter_context(memory_limit_scope(limit))
        stack.enter_context(device_scope(scoped))
        stack.enter_context(DeviceMemory(device, limit).capped())
        yield scoped


@pytest.fixture
def memory_limit(_autobatch_memory_limit: DeviceLimit | None) -> DeviceLimit:
    """The :class:`DeviceLimit` of a test marked ``@pytest.mark.memory_limit(...)``."""
    if _autobatch_memory_limit is None:
        pytest.fail(
            "The `memory_limit` fixture needs a limit: mark the test with @pytest.mark.memory_limit('4GiB').",
            pytrace=False,
        )
    return _autobatch_memory_limit
