"""The on-disk probe cache: a second run on the same setup reuses the probe's answer and trains at once.

A result is stored as one JSON file per setup, named after the :func:`cache_key` of the setup's
:func:`~autobatch.cache.fingerprint.fingerprint`; any change gives a new key and a new probe. Writes
go to a temporary file in the same directory, fsynced, then renamed over the target: concurrent writers
never leave a partial file. A corrupt or unreadable file is ignored with one
:class:`AutobatchCacheWarning` and rewritten by the next put; an unwritable directory only warns.

Imports no torch: ``autobatch cache show`` answers at once.

Example:
    >>> import tempfile
    >>> fp = {"model": "a fingerprint", "dataset_size": 64}
    >>> cache = ProbeCache(tempfile.mkdtemp())
    >>> result = ProbeResult(4, 4, None, "dataset", "cpu", "fp32", None, "none")
    >>> cache.put(cache_key(fp), result, fp) is not None, cache.get(cache_key(fp)).cached
    (True, True)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from autobatch.cache.files import CorruptFile, read_regular
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.result import ProbeResult

__all__ = [
    "CACHE_FORMAT",
    "ENV_VAR",
    "AutobatchCacheWarning",
    "CacheEntry",
    "ProbeCache",
    "cache_key",
    "default_cache_dir",
]

CACHE_FORMAT = 2
"""The layout of a cache file; part of every key, so a new layout never reads an old file.

2: the fingerprint holds digests of what grows with the model (no per-module lists), and the data and the
torch settings."""

ENV_VAR = "AUTOBATCH_CACHE_DIR"
"""The environment variable that overrides the default cache directory."""

_GLOB, _TMP_PREFIX, _TMP_SUFFIX = "probe-*.json", ".probe-", ".tmp"


def cache_key(fp: Mapping[str, Any]) -> str:
    """The SHA-256 hex digest of a JSON-safe fingerprint ``fp`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class AutobatchCacheWarning(UserWarning):
    """A cache file could not be read or written; the probe runs (or its result is not stored)."""


def default_cache_dir() -> Path:
    """``$AUTOBATCH_CACHE_DIR`` when set and non-empty, else the platform's user cache directory."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(local) / "autobatch" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "autobatch"
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says a relative path is invalid and must be ignored.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "autobatch"


@dataclass(frozen=True)
class CacheEntry:
    """One stored probe result, as :meth:`ProbeCache.entries` lists it."""

    key: str
    path: Path
    created: str
    micro_batch: int
    device: str
    precision: str
    memory_limit: int | None
    model: str
    size_bytes: int


def _when(created: str) -> datetime:
    """``created`` as an aware datetime (a naive one is taken as UTC), so that entries sort."""
    when = datetime.fromisoformat(created)
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


class _Stale(Exception):
    """A file an earlier autobatch wrote, in an older format: never read, not corrupt; clear() removes it."""


def _file_mode() -> int:
    """The mode a new file gets under this process's umask (as ``open`` would create it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


class ProbeCache:
    """Probe results on disk, one JSON file per key, in ``directory``.

    Args:
        directory: where the files live; ``None`` for :func:`default_cache_dir` (read now).

    Raises:
        TypeError: ``directory`` is not a str, ``os.PathLike`` or None.
        ValueError: ``directory`` is an empty string.
    """

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        if directory is None:
            directory = default_cache_dir()
        elif not isinstance(directory, (str, os.PathLike)):
            raise UsageTypeError(
                f"Expected `cache_dir` to be a directory path (str or os.PathLike) or None, but got "
                f"{directory!r} ({type(directory).__name__})."
            )
        elif directory == "":
            raise UsageValueError(
                "Expected `cache_dir` to be a directory path, but got ''; pass None for default."
            )
        self.directory = Path(directory).expanduser()
        self._write_warned = False

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``'s result."""
        if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{40,}", key):
            raise UsageValueError(f"Expected `key` to be a hex digest from cache_key(), but got {key!r}.")
        return self.directory / f"probe-{key[:40]}.json"

    def _load(self, path: Path) -> tuple[dict[str, Any], ProbeResult, int]:
        """The file's JSON, its result and its size; raises FileNotFoundError when absent, _Stale for an
        older format, else CorruptFile."""
        raw = read_regular(path)
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict):
                raise TypeError(f"expected a JSON object, got {type(data).__name__}")
            if type(data["format"]) is int and 1 <= data["format"] < CACHE_FORMAT:
                raise _Stale(f"format {data['format']}")
            if data["format"] != CACHE_FORMAT:
                raise ValueError(f"format {data['format']!r}, expected {CACHE_FORMAT}")
            if not isinstance(data["key"], str) or not isinstance(data["fingerprint"], dict):
                raise TypeError("`key` or `fingerprint` has the wrong type")
            _when(data["created"])
            result = ProbeResult.from_dict(data["result"])
            if result.predicted:  # only put() writes here, and it refuses predictions: not autobatch's file
                raise ValueError("a predicted result, where the cache holds measured ones")
            size = data["fingerprint"].get("dataset_size")
            if isinstance(size, int) and not isinstance(size, bool) and result.max_fitting_batch > size:
                raise ValueError(f"a largest fitting batch of {result.max_fitting_batch} in {size} samples")
        # JSON and Unicode errors are ValueErrors; deep nesting raises RecursionError.
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise CorruptFile(f"not a valid cache file ({type(exc).__name__}: {exc})") from exc
        return data, result, len(raw)

    @staticmethod
    def _warn_corrupt(path: Path, why: str) -> None:
        warnings.warn(
            f"Ignoring the probe cache file {path}: {why}. The probe runs again and rewrites it; "
            "delete the file, or pass cache=False, to silence this.",
            AutobatchCacheWarning,
            stacklevel=3,
        )

    def get(self, key: str) -> ProbeResult | None:
        """The stored result for ``key`` with ``cached=True``, or ``None`` when absent or unusable."""
        path = self.path_for(key)
        try:
            data, result, _ = self._load(path)
        except (FileNotFoundError, NotADirectoryError, _Stale):
            return None
        except CorruptFile as exc:
            self._warn_corrupt(path, str(exc))
            return None
        if data["key"] != key:  # a prefix collision or a copied file: not ours, a plain miss
            return None
        return replace(result, cached=True)

    def drop(self, key: str) -> None:
        """Delete ``key``'s result (it failed its verification): the next probe stores a fresh one."""
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
            self.path_for(key).unlink()

    def put(self, key: str, result: ProbeResult, fingerprint: Mapping[str, Any]) -> Path | None:
        """Store ``result`` (as uncached) for ``key`` atomically; the path, or ``None`` if it could not."""
        if not isinstance(result, ProbeResult):
            raise UsageTypeError(f"Expected `result` to be a ProbeResult, but got {type(result).__name__}.")
        if result.predicted:
            raise UsageValueError(
                "Expected a probed result, but got a predicted one: the cache serves what was measured on "
                "the setup, and a prediction ran on fake tensors (for another card, maybe)."
            )
        path = self.path_for(key)
        payload = {
            "format": CACHE_FORMAT,
            "key": key,
            "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            "fingerprint": dict(fingerprint),
            "result": replace(result, cached=False, verified=False).to_dict(),
        }
        text = json.dumps(payload, indent=1, sort_keys=True)
        tmp: str | None = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=_TMP_PREFIX, suffix=_TMP_SUFFIX)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                if hasattr(os, "fchmod"):
                    os.fchmod(f.fileno(), _file_mode())  # mkstemp's 0600 ignores the umask
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if not self._write_warned:
                self._write_warned = True
                warnings.warn(
                    f"Could not write the probe cache in {self.directory} ({exc.strerror or exc}); the "
                    f"result is not stored. Set {ENV_VAR} or pass cache_dir= to a writable directory.",
                    AutobatchCacheWarning,
                    stacklevel=2,
                )
            return None
        return path

    def entries(self) -> list[CacheEntry]:
        """Every valid stored result, newest first; a corrupt file is skipped with one warning, an older
        autobatch's (an older format) silently."""
        found = []
        for path in self.directory.glob(_GLOB) if self.directory.is_dir() else ():
            try:
                data, result, size = self._load(path)
            except (FileNotFoundError, _Stale):  # removed by a concurrent clear(), or an older autobatch's
                continue
            except CorruptFile as exc:
                self._warn_corrupt(path, str(exc))
                continue
            described = data["fingerprint"].get("model")
            model = described.get("class") if isinstance(described, dict) else None
            # The class's own name; "?" for a fingerprint not made by fingerprint().
            model = model.rsplit(".", 1)[-1] if isinstance(model, str) and model else "?"
            found.append(
                CacheEntry(
                    key=data["key"],
                    path=path,
                    created=data["created"],
                    micro_batch=result.micro_batch,
                    device=result.device,
                    precision=result.precision,
                    memory_limit=result.memory_limit,
                    model=model,
                    size_bytes=size,
                )
            )
        found.sort(key=lambda e: (_when(e.created), e.key), reverse=True)
        return found

    def clear(self) -> int:
        """Delete every stored result (and temporary files left by interrupted writes); how many results."""
        if not self.directory.is_dir():
            return 0
        removed = 0
        for pattern in (_GLOB, f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
            for path in self.directory.glob(pattern):
                # Gone already (a concurrent clear()), or not a file autobatch wrote (a directory): skipped.
                with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                    path.unlink()
                    if pattern == _GLOB:
                        removed += 1
        return removed
