"""PyTorch's ``PYTORCH_CUDA_ALLOC_CONF``: which settings of its CUDA caching allocator the model follows.

:func:`parse_alloc_conf` reads the variable's text into an :class:`AllocatorConfig`, which
:class:`~autobatch.memory.allocator.CachingAllocator` takes. It follows the syntax of PyTorch's
``AllocatorConfig::parseArgs`` (``c10/core/AllocatorConfig.cpp``): comma-separated ``key:value`` settings,
spaces ignored, ``[...]`` lists for ``roundup_power2_divisions``. Settings the model does not follow are
reported, never dropped. It imports only the standard library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["AllocatorConfig", "parse_alloc_conf"]

# Settings PyTorch accepts that change nothing the model sees: host (pinned) memory and locking.
_NO_EFFECT = frozenset(
    {
        "release_lock_on_cudamalloc",
        "pinned_use_cuda_host_register",
        "pinned_num_register_threads",
        "pinned_use_background_threads",
    }
)
_ENTRY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):(\[[^\[\]]*\]|[^,:\[\]]+)(?:,|\Z)")


@dataclass(frozen=True)
class AllocatorConfig:
    """The settings of PyTorch's caching allocator that the model follows (defaults: PyTorch's).

    Attributes:
        expandable_segments: grow one segment per pool by mapping pages (``expandable_segments:True``).
        max_split_size_mb: blocks of at least this many MiB are never split, and serve only requests of
            at least that size (``max_split_size_mb``); ``None`` for no limit. Not modelled together with
            expandable segments, whose interplay PyTorch is still changing (pytorch/pytorch#123548).
        unmodelled: ``key:value`` settings read from the text that the model does not follow (unknown
            keys, and known ones that change allocation: ``roundup_power2_divisions``, ``backend``, ...).
    """

    expandable_segments: bool = False
    max_split_size_mb: int | None = None
    unmodelled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.expandable_segments, bool):
            raise TypeError(
                f"Expected `expandable_segments` to be a bool, but got {self.expandable_segments!r}."
            )
        mss = self.max_split_size_mb
        if mss is not None and not (isinstance(mss, int) and not isinstance(mss, bool) and mss >= 20):
            raise ValueError(
                f"Expected `max_split_size_mb` to be None or an int >= 20 (MiB), but got {mss!r}."
            )
        if mss is not None and self.expandable_segments:
            raise ValueError(
                f"Expected `max_split_size_mb` to be None with expandable segments, but got {mss!r}: the "
                "model does not combine them (parse_alloc_conf reports it as unmodelled instead)."
            )
        if not (isinstance(self.unmodelled, tuple) and all(isinstance(s, str) for s in self.unmodelled)):
            raise TypeError(f"Expected `unmodelled` to be a tuple of str, but got {self.unmodelled!r}.")

    @property
    def alloc_conf(self) -> str:
        """The modelled settings as ``PYTORCH_CUDA_ALLOC_CONF`` text (``""`` for the default allocator)."""
        parts = ["expandable_segments:True"] if self.expandable_segments else []
        if self.max_split_size_mb is not None:
            parts.append(f"max_split_size_mb:{self.max_split_size_mb}")
        return ",".join(parts)


def parse_alloc_conf(text: str | None) -> AllocatorConfig:
    """Read a ``PYTORCH_CUDA_ALLOC_CONF`` value: comma-separated ``key:value`` settings, spaces ignored.

    Settings the model does not follow are kept in :attr:`AllocatorConfig.unmodelled`; the last of a
    repeated key wins, as in PyTorch's ``parseArgs``.

    Example:
        >>> config = parse_alloc_conf("expandable_segments:True, garbage_collection_threshold:0.6")
        >>> config.expandable_segments, config.unmodelled, config.alloc_conf
        (True, ('garbage_collection_threshold:0.6',), 'expandable_segments:True')

    Raises:
        ValueError: the text is not ``key:value`` settings, or a modelled value is not one PyTorch takes.
    """
    if text is None:
        return AllocatorConfig()
    if not isinstance(text, str):
        raise TypeError(f"Expected the allocator configuration to be a str or None, but got {text!r}.")
    squeezed = text.replace(" ", "")
    settings: dict[str, str] = {}
    position = 0
    while position < len(squeezed):
        match = _ENTRY.match(squeezed, position)
        if match is None:
            raise ValueError(
                f"Expected PYTORCH_CUDA_ALLOC_CONF to be comma-separated key:value settings such as "
                f"'expandable_segments:True', but got {text!r}."
            )
        settings.pop(match[1], None)  # keep the order of the last occurrences
        settings[match[1]] = match[2]
        position = match.end()
    expandable, mss, unmodelled = False, None, []
    for key, value in settings.items():
        if key == "expandable_segments":
            if value not in ("True", "False"):
                raise ValueError(
                    f"Expected expandable_segments to be True or False in PYTORCH_CUDA_ALLOC_CONF, but got "
                    f"{value!r} in {text!r}."
                )
            expandable = value == "True"
        elif key == "max_split_size_mb":
            if not value.isdigit() or int(value) < 20:
                raise ValueError(
                    "Expected max_split_size_mb to be a whole number of MiB >= 20 in "
                    f"PYTORCH_CUDA_ALLOC_CONF, but got {value!r} in {text!r}."
                )
            mss = int(value)
        elif not (key in _NO_EFFECT or (key == "backend" and value == "native")):
            unmodelled.append(f"{key}:{value}")
    if expandable and mss is not None:
        unmodelled.append(f"max_split_size_mb:{mss}")
        mss = None
    return AllocatorConfig(expandable, mss, tuple(unmodelled))
