"""autobatch's pytest plugin (entry point ``pytest11``): small-device markers for CI smoke tests.

Installing autobatch enables it (``-p no:autobatch`` turns it off). It adds:

* ``@pytest.mark.memory_limit("4GiB")``: the test runs as on a device of that size. Every probe, fit,
  try_batch, assert_fits and assert_trains in it that passes no ``memory_limit`` uses the limit (the CPU
  emulates a device of that size); on a CUDA machine the caching allocator of the current device is also
  capped to it for the whole test. Both are restored after the test, failed or not.
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
        "memory_limit(limit): run the test as on a device of `limit` (bytes or e.g. '4GiB'): the CUDA "
        "allocator capped on a GPU, autobatch's emulated device on the CPU (autobatch.testing)",
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


def _marker_limit(marker: pytest.Mark) -> int:
    values = [*marker.args, *marker.kwargs.values()]
    if len(values) != 1 or values[0] is None or set(marker.kwargs) - {"limit"}:
        given = ", ".join([*map(repr, marker.args), *(f"{k}={v!r}" for k, v in marker.kwargs.items())])
        pytest.fail(
            "Expected `@pytest.mark.memory_limit` to take one limit, e.g. @pytest.mark.memory_limit('4GiB'), "
            f"but got memory_limit({given}).",
            pytrace=False,
        )
    from autobatch.units import parse_memory_limit

    try:
        nbytes = parse_memory_limit(values[0], name="@pytest.mark.memory_limit")
    except (TypeError, ValueError) as exc:
        pytest.fail(str(exc), pytrace=False)
    assert nbytes is not None  # values[0] is not None
    return nbytes


@pytest.fixture(autouse=True)
def _autobatch_memory_limit(request: pytest.FixtureRequest) -> Iterator[DeviceLimit | None]:
    """Run a ``memory_limit``-marked test inside the limit; the limit is undone at teardown."""
    marker = request.node.get_closest_marker("memory_limit")
    if marker is None:
        yield None
        return
    limit = _marker_limit(marker)

    from autobatch.memory.device import DeviceMemory, memory_limit_scope
    from autobatch.session import check_device_available, default_device
    from autobatch.testing import DeviceLimit

    # On CUDA the whole test body runs under the allocator cap (restored after, as DeviceMemory does).
    device = check_device_available(default_device(), "default")
    with contextlib.ExitStack() as stack:
        stack.enter_context(memory_limit_scope(limit))
        stack.enter_context(DeviceMemory(device, limit).capped())
        yield DeviceLimit.on(limit, device)


@pytest.fixture
def memory_limit(_autobatch_memory_limit: DeviceLimit | None) -> DeviceLimit:
    """The :class:`DeviceLimit` of a test marked ``@pytest.mark.memory_limit(...)``."""
    if _autobatch_memory_limit is None:
        pytest.fail(
            "The `memory_limit` fixture needs a limit: mark the test with @pytest.mark.memory_limit('4GiB').",
            pytrace=False,
        )
    return _autobatch_memory_limit
