"""The probe cache as one probe sees it: the key of this setup, and which rank reads and writes.

:mod:`autobatch.cache.store` stores results on disk and :mod:`autobatch.cache.fingerprint` describes a setup;
this module joins them for one :class:`~autobatch.probing.prober.Prober`: rank 0 reads and writes, the other
ranks take its answer. The key is never why a probe fails: when it cannot be computed (user code that raises
while it is read, say) the probe runs without the cache, with one
:class:`~autobatch.cache.store.AutobatchCacheWarning` per cause and process.
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from typing import TYPE_CHECKING, Any

from autobatch.result import ProbeResult

if TYPE_CHECKING:
    from autobatch.probing.prober import Prober

__all__ = ["ProbeStore"]

logger = logging.getLogger("autobatch.probe")

_warned: set[str] = set()
"""The causes already warned about in this process: the next ones are logged at debug level."""


def _key_failed(exc: Exception) -> None:
    """Say, once per cause, that the cache is off for this call because its key could not be computed."""
    from autobatch.cache.store import AutobatchCacheWarning

    cause = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")[:300]
    if cause in _warned:
        logger.debug("probe cache off for this call: its key could not be computed (%s)", cause)
        return
    _warned.add(cause)
    warnings.warn(
        f"The probe cache is off for this call: its key could not be computed ({cause}). The probe runs "
        "as usual, without the cache; pass cache=False to silence this.",
        AutobatchCacheWarning,
        stacklevel=4,
    )


class ProbeStore:
    """The probe cache as one probe sees it: rank 0 reads and writes, and tells the other ranks.

    The key holds every option that changes a step's memory (the ``keyed`` fields of
    :mod:`autobatch.options`), each by what it resolved to: the optimizer by its type and settings, the
    precision resolved for the device, the limit the probe ran under (under a group, the smallest).
    """

    _RESOLVED = frozenset({"optimizer", "precision", "device", "memory_limit"})
    # (emulation is keyed as given: "auto" resolves by the limit, which the key holds too)

    def __init__(self, prober: Prober, cache: Any, fp: dict[str, Any], key: str) -> None:
        self.prober, self.cache, self.fingerprint, self.key = prober, cache, fp, key
        self.group = prober.session.group

    @classmethod
    def open(cls, prober: Prober, cap: int) -> ProbeStore | None:
        """The store for this probe, or ``None`` with ``cache=False`` or when the key cannot be computed."""
        from autobatch.cache.fingerprint import fingerprint
        from autobatch.cache.store import ProbeCache, cache_key

        session = prober.session
        options = session.options
        if not options.cache.cache:
            return None
        keyed = {**options.step.keyed(), **options.memory.keyed(), **options.probe.keyed()}
        keyed = {k: v for k, v in keyed.items() if k not in cls._RESOLVED}
        sample = session.source.worst_case(1, options.probe.size_fn)  # the user's data: its errors are theirs
        started, failure = time.perf_counter(), None
        try:
            fp = fingerprint(
                model=session.model,
                optimizer=prober.optimizer,
                precision=session.precision,
                device=session.device,
                # Under a group the answer depends on the tightest rank's limit, not on this rank's.
                memory_limit=prober.capacity if session.group is not None else prober.memory.limit,
                world_size=session.group.world_size if session.group is not None else 1,
                sample=sample,
                dataset_size=len(session.source),
                options={**keyed, "max_batch": cap},
                dataset=session.source.dataset,
                collate_fn=session.source.collate_fn,
            )
            key = cache_key(fp)
        except Exception as exc:  # the key must never be why a probe fails: any cause, the cache is off
            failure = exc
        failed = failure is not None
        if session.group is not None:  # every rank uses the cache, or none does
            failed = session.group.max([float(failed)])[0] > 0
        if failure is not None:
            _key_failed(failure)
        if failed:
            return None
        logger.debug("probe cache key computed in %.3f s", time.perf_counter() - started)
        return cls(prober, ProbeCache(options.cache.cache_dir), fp, key)

    @property
    def _main(self) -> bool:
        return self.group is None or self.group.is_main

    def lookup(self) -> ProbeResult | None:
        hit = self.cache.get(self.key) if self._main else None
        if self.group is not None:  # every rank takes rank 0's answer, hit or miss
            found = self.group.broadcast(hit.to_dict() if hit is not None else None)
            hit = ProbeResult.from_dict(found) if found is not None else None
        return hit

    def save(self, result: ProbeResult) -> None:
        """Store ``result`` under this setup's key, and under the key of the model as the probe left it.

        A forward may set a module's attributes on its first call (Hugging Face's ``config.problem_type``,
        a cache a layer builds lazily): the next probe of this model object in this process keys it as it
        is now, and finds the result too.
        """
        if not self._main:
            return
        from autobatch.cache.fingerprint import with_model
        from autobatch.cache.store import cache_key

        self.cache.put(self.key, result, self.fingerprint)
        try:
            after = with_model(self.fingerprint, self.prober.session.model)
            key = cache_key(after)
        except Exception as exc:  # the key is never why a probe fails: this second entry is a convenience
            logger.debug("probe cache: the model's key after the probe could not be computed (%s)", exc)
            return
        if key != self.key:
            self.cache.put(key, result, after)

    def drop(self) -> None:
        """Forget this setup's stored result (rank 0 deletes it): it failed its verification."""
        if self._main:
            self.cache.drop(self.key)
