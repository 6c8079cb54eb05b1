"""The on-disk probe cache: keys, round trips, corrupt files, unwritable directories, concurrent writers."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autobatch
from autobatch.cache.files import MAX_FILE_BYTES
from autobatch.cache.fingerprint import fingerprint
from autobatch.cache.store import (
    CACHE_FORMAT,
    ENV_VAR,
    AutobatchCacheWarning,
    ProbeCache,
    cache_key,
    default_cache_dir,
)
from autobatch.probing.search import Trial
from autobatch.result import ProbeResult


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test caches under its own tmp_path, never in the real home cache."""
    directory = tmp_path / "env-cache"
    monkeypatch.setenv(ENV_VAR, str(directory))
    return directory


@pytest.fixture
def no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def mlp(width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 2))


def setup(**changes: Any) -> dict[str, Any]:
    """The fingerprint of a small setup, with ``changes`` to its arguments."""
    args: dict[str, Any] = {
        "model": mlp(),
        "optimizer": None,
        "precision": "fp32",
        "device": torch.device("cpu"),
        "memory_limit": 256 * 1024,
        "world_size": 1,
        "sample": (torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)),
        "dataset_size": 64,
        "options": {"margin": 0.0, "multiple_of": 1, "loss_fn": F.cross_entropy},
    }
    args.update(changes)
    return fingerprint(**args)


def made_result(micro: int = 8, n_trials: int = 3) -> ProbeResult:
    """A hand-made result whose size (in trials) varies with ``n_trials``."""
    trials = [
        Trial(batch=i + 1, fitted=True, peak_bytes=1000 * (i + 1), seconds=0.01) for i in range(n_trials)
    ]
    trials.append(Trial(batch=n_trials + 1, fitted=False, peak_bytes=None, seconds=0.02))
    return ProbeResult(
        micro_batch=micro,
        max_fitting_batch=micro,
        first_failure=micro + 1,
        capped_by=None,
        device="cpu",
        precision="fp32",
        memory_limit=256 * 1024,
        limit_kind="256.0 KiB (emulated)",
        trials=trials,
        fixed_bytes=100.0,
        bytes_per_sample=10.5,
        model_state_bytes=1234,
        optimizer_steps=n_trials + 2,
        ooms=1,
        seconds=0.5,
    )


def one_warning(action: Callable[[], Any]) -> Any:
    """Run ``action``; check that it warned exactly once, with an AutobatchCacheWarning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = action()
    assert [w.category for w in caught] == [AutobatchCacheWarning], [str(w.message) for w in caught]
    one_warning.last = str(caught[0].message)  # type: ignore[attr-defined]
    return out


# --- round trip ------------------------------------------------------------------------------------


def test_round_trip_of_a_real_probe(no_warnings: None) -> None:
    torch.manual_seed(0)
    X, y = torch.randn(256, 8), torch.randint(0, 2, (256,))
    result = autobatch.probe(mlp(), (X, y), memory_limit="256KiB", precision="fp32", device="cpu")
    fp = setup(dataset_size=256)
    cache = ProbeCache()
    path = cache.put(cache_key(fp), result, fp)
    assert path == cache.path_for(cache_key(fp)) and path.is_file()
    assert json.loads(path.read_text())["result"]["cached"] is False
    loaded = cache.get(cache_key(fp))
    assert loaded == replace(result, cached=True)
    assert all(isinstance(t, Trial) for t in loaded.trials)
    assert loaded.summary().endswith(" (from the probe cache)") and "cache" not in result.summary()


def test_put_stores_the_uncached_result(no_warnings: None) -> None:
    fp, cache = setup(), ProbeCache()
    path = cache.put(cache_key(fp), replace(made_result(), cached=True), fp)
    assert path is not None
    data = json.loads(path.read_text())
    assert data["format"] == CACHE_FORMAT and data["key"] == cache_key(fp) and data["fingerprint"] == fp
    assert data["result"]["cached"] is False


def test_a_predicted_result_is_never_stored_nor_served() -> None:
    fp, cache = setup(), ProbeCache()
    predicted = replace(made_result(), predicted=True, gpu="T4", budget_bytes=2**30, kernels="cuda:7.5")
    with pytest.raises(ValueError, match="Expected a probed result, but got a predicted one"):
        cache.put(cache_key(fp), predicted, fp)
    assert cache.entries() == []
    # A file holding one (not autobatch's: put refuses them) is ignored with a warning, never served.
    path = cache.put(cache_key(fp), made_result(), fp)
    assert path is not None
    data = json.loads(path.read_text())
    data["result"].update(predicted=True, gpu="T4")
    path.write_text(json.dumps(data))
    assert one_warning(lambda: cache.get(cache_key(fp))) is None
    assert "a predicted result" in one_warning.last  # type: ignore[attr-defined]


def test_miss_for_an_unknown_key(no_warnings: None) -> None:
    cache = ProbeCache()
    assert cache.get(cache_key(setup())) is None  # the directory does not even exist
    cache.put(cache_key(setup()), made_result(), setup())
    assert cache.get(cache_key(setup(world_size=2))) is None


def test_a_file_holding_another_key_is_a_plain_miss(no_warnings: None) -> None:
    cache, key = ProbeCache(), cache_key(setup())
    other = key[:40] + "0" * 24  # the same file name, another key
    cache.put(other, made_result(), setup())
    assert cache.get(key) is None


def test_path_for_names_the_key_and_refuses_non_keys() -> None:
    cache, key = ProbeCache(), cache_key(setup())
    assert cache.path_for(key).name == f"probe-{key[:40]}.json"
    with pytest.raises(ValueError, match="`key`"):
        cache.path_for("../../etc/passwd")


# --- keys ------------------------------------------------------------------------------------------


def frozen_first_layer() -> nn.Module:
    model = mlp()
    model[0].weight.requires_grad_(False)
    return model


CHANGES: dict[str, Callable[[], dict[str, Any]]] = {
    "layer width": lambda: {"model": mlp(width=32)},
    "dtype": lambda: {"model": mlp().double()},
    "added module": lambda: {"model": nn.Sequential(*mlp(), nn.Dropout())},
    "module type": lambda: {"model": nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))},
    "requires_grad": lambda: {"model": frozen_first_layer()},
    "buffer": lambda: {"model": nn.Sequential(*mlp(), nn.BatchNorm1d(2, affine=False))},
    "optimizer added": lambda: {"optimizer": torch.optim.SGD(mlp().parameters(), lr=0.1)},
    "optimizer type": lambda: {"optimizer": torch.optim.Adam(mlp().parameters())},
    "optimizer amsgrad": lambda: {"optimizer": torch.optim.AdamW(mlp().parameters(), amsgrad=True)},
    "precision": lambda: {"precision": "bf16"},
    "device": lambda: {"device": torch.device("meta")},
    "memory limit": lambda: {"memory_limit": 512 * 1024},
    "no memory limit": lambda: {"memory_limit": None},
    "world size": lambda: {"world_size": 2},
    "sample shape": lambda: {"sample": (torch.zeros(4, 9), torch.zeros(4, dtype=torch.long))},
    "sample dtype": lambda: {
        "sample": (torch.zeros(4, 8, dtype=torch.half), torch.zeros(4, dtype=torch.long))
    },
    "sample structure": lambda: {"sample": {"x": torch.zeros(4, 8), "y": torch.zeros(4, dtype=torch.long)}},
    "dataset size": lambda: {"dataset_size": 65},
    "option value": lambda: {"options": {"margin": 0.1, "multiple_of": 1, "loss_fn": F.cross_entropy}},
    "option callable": lambda: {"options": {"margin": 0.0, "multiple_of": 1, "loss_fn": F.mse_loss}},
    "option added": lambda: {
        "options": {"margin": 0.0, "multiple_of": 1, "loss_fn": F.cross_entropy, "x": 1}
    },
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_component_changes_the_key(change: Callable[[], dict[str, Any]]) -> None:
    assert cache_key(setup(**change())) != cache_key(setup())


def test_the_versions_change_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_key(setup())
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    after_torch = cache_key(setup())
    monkeypatch.setattr("autobatch.cache.fingerprint.__version__", "0.0.0")
    assert len({before, after_torch, cache_key(setup())}) == 3


def test_the_key_ignores_weights_and_learning_rate() -> None:
    torch.manual_seed(1)
    first = mlp()
    torch.manual_seed(2)
    second = mlp()
    assert not torch.equal(first[0].weight, second[0].weight)
    a = setup(model=first, optimizer=torch.optim.Adam(first.parameters(), lr=1e-3))
    b = setup(model=second, optimizer=torch.optim.Adam(second.parameters(), lr=3e-4))
    assert cache_key(a) == cache_key(b)


def test_the_fingerprint_is_json_and_stable() -> None:
    class Weird:
        pass

    fp = setup(options={"fn": lambda x: x, "obj": Weird(), "nan": float("nan"), "dtype": torch.bfloat16})
    assert json.loads(json.dumps(fp)) == fp
    assert cache_key(fp) == cache_key(
        setup(options={"fn": lambda x: x, "obj": Weird(), "nan": float("nan"), "dtype": torch.bfloat16})
    )
    assert fp["options"]["fn"]["callable"].endswith("<lambda>") and "0x" not in json.dumps(
        fp["options"]["obj"]
    )
    assert fp["device"]["type"] == "cpu" and fp["model"]["class"] == "torch.nn.modules.container.Sequential"
    assert fp["model"]["modules"] == 4 and fp["model"]["parameters"] == 8 * 16 + 16 + 16 * 2 + 2


# --- directories -----------------------------------------------------------------------------------


def test_env_var_then_explicit_directory(_cache_dir: Path, tmp_path: Path) -> None:
    assert default_cache_dir() == _cache_dir
    assert ProbeCache().directory == _cache_dir
    assert ProbeCache(tmp_path / "explicit").directory == tmp_path / "explicit"
    assert ProbeCache(str(tmp_path / "explicit")).directory == tmp_path / "explicit"


def test_default_directory_is_read_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = ProbeCache()
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "later"))
    assert cache.directory != tmp_path / "later"
    assert ProbeCache().directory == tmp_path / "later"


@pytest.mark.skipif(sys.platform in ("win32", "darwin"), reason="the XDG layout is Linux's")
def test_empty_env_var_falls_back_to_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "autobatch"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "autobatch"


def test_a_bad_directory_argument_is_refused() -> None:
    with pytest.raises(TypeError, match=r"`cache_dir`.*\(int\)"):
        ProbeCache(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`cache_dir`"):
        ProbeCache("")


# --- corrupt files ---------------------------------------------------------------------------------


def valid_text() -> str:
    fp = setup()
    return ProbeCache().put(cache_key(fp), made_result(), fp).read_text()  # type: ignore[union-attr]


def with_json(**changes: Any) -> Callable[[], bytes]:
    def make() -> bytes:
        data = json.loads(valid_text())
        data.update(changes)
        return json.dumps(data).encode()

    return make


CORRUPT: dict[str, Callable[[], bytes]] = {
    "garbage": lambda: b"\x00\xff\xfe\x80 not json at all",
    "empty": lambda: b"",
    "truncated": lambda: valid_text().encode()[: len(valid_text()) // 2],
    "a list": lambda: b"[1, 2, 3]",
    "missing result": lambda: json.dumps({"format": CACHE_FORMAT, "key": "k"}).encode(),
    "wrong format": with_json(format=CACHE_FORMAT + 1),
    "bad result": with_json(result={"micro_batch": "many"}),
    "zero micro-batch": with_json(result=dict(made_result().to_dict(), micro_batch=0)),
    "unknown field": with_json(result=dict(made_result().to_dict(), surprise=1)),
    "bad trial": with_json(result=dict(made_result().to_dict(), trials=[{"batch": 1}])),
    "bad created": with_json(created="yesterday"),
    "fingerprint not a dict": with_json(fingerprint=[1]),
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_file_warns_once_and_is_rewritten(content: Callable[[], bytes]) -> None:
    cache, fp = ProbeCache(), setup()
    key = cache_key(fp)
    cache.path_for(key).parent.mkdir(parents=True, exist_ok=True)
    cache.path_for(key).write_bytes(content())
    assert one_warning(lambda: cache.get(key)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.put(key, made_result(micro=5), fp) == cache.path_for(key)
        assert cache.get(key) == replace(made_result(micro=5), cached=True)


def chmod_bites(path: Path) -> bool:
    return not os.access(path, os.R_OK | os.W_OK)


@pytest.mark.skipif(sys.platform == "win32", reason="chmod does not deny reading on Windows")
def test_an_unreadable_file_warns_once_and_is_rewritten() -> None:
    cache, fp = ProbeCache(), setup()
    key = cache_key(fp)
    path = cache.put(key, made_result(), fp)
    assert path is not None
    path.chmod(0)
    try:
        if not chmod_bites(path):
            pytest.skip("running as root: chmod 000 does not deny reading")
        assert one_warning(lambda: cache.get(key)) is None
        assert cache.put(key, made_result(micro=3), fp) == path  # replaces the entry, not writes into it
        assert cache.get(key) == replace(made_result(micro=3), cached=True)
    finally:
        path.chmod(0o644)


# --- unwritable directories ------------------------------------------------------------------------


def test_a_directory_under_a_file_only_warns_once(tmp_path: Path, no_warnings: None) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    cache, fp = ProbeCache(tmp_path / "a-file" / "cache"), setup()
    assert one_warning(lambda: cache.put(cache_key(fp), made_result(), fp)) is None
    assert cache.put(cache_key(fp), made_result(), fp) is None  # warned once per cache
    assert cache.get(cache_key(fp)) is None and cache.entries() == [] and cache.clear() == 0


@pytest.mark.skipif(sys.platform == "win32", reason="chmod does not deny writing on Windows")
def test_a_read_only_directory_only_warns(tmp_path: Path) -> None:
    directory = tmp_path / "read-only"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as root: chmod does not deny writing")
        cache, fp = ProbeCache(directory), setup()
        assert one_warning(lambda: cache.put(cache_key(fp), made_result(), fp)) is None
        assert list(directory.iterdir()) == []
    finally:
        directory.chmod(0o755)


# --- concurrent writers ----------------------------------------------------------------------------


def _writer(directory: str, key: str, fp: dict[str, Any], worker: int, puts: int) -> None:
    cache = ProbeCache(directory)
    for i in range(puts):
        micro = 1 + worker * puts + i
        if cache.put(key, made_result(micro=micro, n_trials=micro % 37), fp) is None:
            raise SystemExit(f"put {i} of worker {worker} failed")


def test_concurrent_writers_never_leave_a_partial_file(tmp_path: Path) -> None:
    workers, puts = 4, 50
    directory, fp = tmp_path / "shared", setup(dataset_size=workers * puts)
    key = cache_key(fp)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    processes = [
        context.Process(target=_writer, args=(str(directory), key, fp, w, puts)) for w in range(workers)
    ]
    reader = ProbeCache(directory)
    seen: list[ProbeResult | None] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for p in processes:
            p.start()
        deadline = time.monotonic() + 60
        while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
            seen.append(reader.get(key))
        for p in processes:
            p.join(timeout=60)
        seen.append(reader.get(key))
    assert [p.exitcode for p in processes] == [0] * workers
    assert [str(w.message) for w in caught] == []
    results = [r for r in seen if r is not None]
    assert results and seen[-1] is not None
    for r in results:
        assert r.cached and 1 <= r.micro_batch <= workers * puts
        assert r == replace(made_result(micro=r.micro_batch, n_trials=r.micro_batch % 37), cached=True)
    assert sorted(p.name for p in directory.iterdir()) == [reader.path_for(key).name]


# --- listing and clearing --------------------------------------------------------------------------


def test_entries_newest_first_and_clear(_cache_dir: Path) -> None:
    cache = ProbeCache()
    keys = []
    for i, created in enumerate(
        ["2024-01-02T00:00:00+00:00", "2024-03-01T00:00:00+00:00", "2023-12-31T23:59"]
    ):
        fp = setup(dataset_size=100 + i)
        path = cache.put(cache_key(fp), made_result(micro=i + 1), fp)
        assert path is not None
        data = json.loads(path.read_text())
        data["created"] = created  # the last one naive: taken as UTC
        path.write_text(json.dumps(data))
        keys.append(cache_key(fp))
    (_cache_dir / "probe-0000000000000000000000000000000000000000.json").write_text("{truncated")
    (_cache_dir / ".probe-leftover.tmp").write_text("{")
    (_cache_dir / "unrelated.txt").write_text("keep me")

    entries = one_warning(cache.entries)
    assert [e.key for e in entries] == [keys[1], keys[0], keys[2]]
    assert [e.micro_batch for e in entries] == [2, 1, 3]
    first = entries[0]
    assert first.model == "Sequential" and first.device == "cpu" and first.precision == "fp32"
    assert first.memory_limit == 256 * 1024 and first.created == "2024-03-01T00:00:00+00:00"
    assert first.path == cache.path_for(keys[1]) and first.size_bytes == first.path.stat().st_size

    assert cache.clear() == 4  # the three entries and the corrupt file; the temp file is not an entry
    assert sorted(p.name for p in _cache_dir.iterdir()) == ["unrelated.txt"]
    assert cache.entries() == [] and cache.clear() == 0


def test_entries_and_clear_on_a_missing_directory(tmp_path: Path, no_warnings: None) -> None:
    cache = ProbeCache(tmp_path / "never-created")
    assert cache.entries() == []
    assert cache.clear() == 0
    assert not cache.directory.exists()


# --- ProbeResult -----------------------------------------------------------------------------------


def test_probe_result_from_dict_inverts_to_dict() -> None:
    for result in (made_result(), replace(made_result(n_trials=0), cached=True, capped_by="dataset")):
        data = json.loads(json.dumps(result.to_dict()))
        assert ProbeResult.from_dict(data) == result
    assert "cached" in made_result().to_dict()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ([1, 2], TypeError),
        ({"micro_batch": 1}, KeyError),
        (dict(made_result().to_dict(), micro_batch=True), TypeError),
        (dict(made_result().to_dict(), max_fitting_batch=-1), ValueError),
        (dict(made_result().to_dict(), trials={"batch": 1}), TypeError),
        (dict(made_result().to_dict(), trials=[[1, True, None, 0.1]]), TypeError),
        (dict(made_result().to_dict(), extra=1), TypeError),
    ],
)
def test_probe_result_from_dict_refuses_malformed_data(data: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        ProbeResult.from_dict(data)


def test_a_cached_result_says_so_in_the_summary_and_the_table() -> None:
    from rich.console import Console

    result = replace(made_result(), cached=True, verified=True)
    assert result.summary().endswith("1 OOM (from the probe cache, verified)")

    def rendered(r: ProbeResult) -> str:
        console = Console(file=io.StringIO(), width=120)
        console.print(r)
        return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]

    assert "autobatch probe: micro-batch 8 (from the probe cache, verified)" in rendered(result)
    assert "cache" not in rendered(made_result())


# -- probe and fit read and write the cache ------------------------------------------------------------


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_probe_reuses_its_cached_result_after_two_verifying_steps(no_warnings: None) -> None:
    """A fresh hit costs two steps: the traced cold step at batch 2 and a steady one at the cached answer,
    whose timelines predict that answer again (the answer's own step being the one that decides it)."""
    model, data = mlp(), _data()
    first = autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu")
    assert first.cached is False and first.verified is False and len(ProbeCache().entries()) == 1
    second = autobatch.probe(mlp(), data, memory_limit="64KiB", precision="fp32", device="cpu")
    assert second.cached is True and second.verified is True
    assert second.optimizer_steps <= 3 < first.optimizer_steps + 1
    assert replace(second, cached=False, verified=False, optimizer_steps=0, seconds=0.0) == replace(
        first, optimizer_steps=0, seconds=0.0
    )


@pytest.mark.parametrize(("stored", "most_steps"), [(0.5, 4), (2.0, 5)], ids=["stale-small", "stale-large"])
def test_a_stale_entry_is_probed_again_from_what_verification_learned(
    stored: float, most_steps: int, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry whose answer is too small (the step got lighter, in a way no key sees) or too large
    (heavier): the verification's two steps make the model, and two verdicts settle the right answer."""
    model, data = mlp(), _data(1024)
    truth = autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu")
    (entry,) = ProbeCache().entries()
    raw = json.loads(entry.path.read_text())
    wrong = max(1, int(truth.max_fitting_batch * stored))
    raw["result"].update(micro_batch=wrong, max_fitting_batch=wrong, first_failure=wrong + 1)
    entry.path.write_text(json.dumps(raw))
    again = autobatch.probe(mlp(), data, memory_limit="64KiB", precision="fp32", device="cpu")
    assert again.cached is False and again.micro_batch == truth.micro_batch
    assert again.optimizer_steps <= most_steps
    assert f"the cached micro-batch {wrong} is too" in caplog.text
    assert autobatch.probe(mlp(), data, memory_limit="64KiB", precision="fp32", device="cpu").cached


def test_probe_cache_false_neither_reads_nor_writes(tmp_path: Path) -> None:
    model, data = mlp(), _data()
    autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu")
    again = autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu", cache=False)
    assert again.cached is False
    elsewhere = tmp_path / "elsewhere"
    autobatch.probe(
        model, data, memory_limit="64KiB", precision="fp32", device="cpu", cache=False, cache_dir=elsewhere
    )
    assert not elsewhere.exists()
    with pytest.raises(TypeError, match="`cache` to be True or False"):
        autobatch.probe(model, data, memory_limit="64KiB", cache="yes")  # type: ignore[arg-type]


def test_probe_cache_dir_argument_wins_over_the_environment(tmp_path: Path) -> None:
    chosen = tmp_path / "chosen"
    autobatch.probe(mlp(), _data(), memory_limit="64KiB", precision="fp32", device="cpu", cache_dir=chosen)
    assert len(ProbeCache(chosen).entries()) == 1 and ProbeCache().entries() == []


def test_fit_starts_from_the_cached_probe() -> None:
    data = _data(96)
    options = dict(
        target_batch=32, memory_limit="64KiB", precision="fp32", device="cpu", seed=0, progress=False
    )
    first = autobatch.fit(mlp(), data, **options)
    second = autobatch.fit(mlp(), data, **options)
    assert first.probe is not None and second.probe is not None
    assert (first.probe.cached, second.probe.cached) == (False, True)
    assert second.plan == first.plan
    assert autobatch.fit(mlp(), data, cache=False, **options).probe.cached is False  # type: ignore[union-attr]


def test_a_corrupt_cache_file_warns_once_and_the_probe_rewrites_it() -> None:
    model, data = mlp(), _data()
    autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu")
    (entry,) = ProbeCache().entries()
    entry.path.write_text('{"format": 1, "key": "trunc')
    with pytest.warns(AutobatchCacheWarning) as caught:
        redone = autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu")
    assert len([w for w in caught if issubclass(w.category, AutobatchCacheWarning)]) == 1
    assert redone.cached is False
    assert autobatch.probe(model, data, memory_limit="64KiB", precision="fp32", device="cpu").cached is True


def test_the_key_changes_when_a_module_s_code_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "autobatch_cache_netmod.py"
    source = (
        "import torch\n\nclass Net(torch.nn.Linear):\n"
        "    def forward(self, x):\n        return super().forward(x){}\n"
    )
    path.write_text(source.format(""))
    module = importlib.import_module("autobatch_cache_netmod")
    before = cache_key(setup(model=module.Net(8, 2)))
    assert cache_key(setup(model=module.Net(8, 2))) == before  # same code, same key
    path.write_text(source.format(" * 2"))  # same class name and shapes; a different forward
    module = importlib.reload(module)
    assert cache_key(setup(model=module.Net(8, 2))) != before
    monkeypatch.delitem(sys.modules, "autobatch_cache_netmod")


# -- stale keys: every change that changes a step's memory gives the right micro-batch next time ---------


def _probe(model: nn.Module, **options: Any) -> ProbeResult:
    options = {"memory_limit": "96KiB", "precision": "fp32", "device": "cpu", **options}
    return autobatch.probe(model, _data(512), **options)


def _fresh(model: nn.Module, **options: Any) -> int:
    return _probe(model, cache=False, **options).micro_batch


def _module(tmp_path: Path, name: str, source: str) -> Any:
    """Import ``source`` as module ``name`` from ``tmp_path`` (again: a fresh module object each time)."""
    import importlib

    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)
    importlib.invalidate_caches()
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


HELPER = """
    import torch
    from torch import nn

    def widen(x):
        return {body}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(8, 64), nn.Linear(64, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(widen(x))))[: x.shape[0]]
"""


def test_an_edited_helper_function_of_the_model_is_probed_again(tmp_path: Path) -> None:
    light = _module(tmp_path, "stale_helper", HELPER.format(body="x"))
    first = _probe(light.Net())
    assert _probe(light.Net()).cached  # unchanged: served from the cache
    heavy = _module(tmp_path, "stale_helper", HELPER.format(body="torch.cat([x] * 4)"))
    second = _probe(heavy.Net())
    assert len(ProbeCache().entries()) == 2  # a new key, not a stale entry caught by its verification
    assert second.cached is False and second.micro_batch == _fresh(heavy.Net()) < first.micro_batch


def _stacked(repeat: int) -> Any:
    return lambda out, y: F.cross_entropy(out, y) + 0 * out.repeat(1, repeat).square().mean()


def test_an_edited_lambda_is_probed_again() -> None:
    first = _probe(mlp(64), loss_fn=lambda out, y: F.cross_entropy(out, y))
    assert _probe(mlp(64), loss_fn=lambda out, y: F.cross_entropy(out, y)).cached  # the same code
    heavy = lambda out, y: F.cross_entropy(out, y) + 0 * out.repeat(1, 256).square().mean()  # noqa: E731
    second = _probe(mlp(64), loss_fn=heavy)
    assert len(ProbeCache().entries()) == 2  # a new key, not a stale entry caught by its verification
    assert second.cached is False and second.micro_batch == _fresh(mlp(64), loss_fn=heavy) < first.micro_batch
    # The same code with another captured value is another step too.
    assert _probe(mlp(64), loss_fn=_stacked(2)).micro_batch == _fresh(mlp(64), loss_fn=_stacked(2))
    assert _probe(mlp(64), loss_fn=_stacked(256)).micro_batch == _fresh(mlp(64), loss_fn=_stacked(256))


def test_an_edited_named_loss_is_probed_again(tmp_path: Path) -> None:
    source = "import torch\nimport torch.nn.functional as F\n\ndef loss(out, y):\n    return {body}\n"
    light = _module(tmp_path, "stale_loss", source.format(body="F.cross_entropy(out, y)"))
    first = _probe(mlp(64), loss_fn=light.loss)
    heavy_body = "F.cross_entropy(out, y) + 0 * out.repeat(1, 256).square().mean()"
    heavy = _module(tmp_path, "stale_loss", source.format(body=heavy_body))
    second = _probe(mlp(64), loss_fn=heavy.loss)
    assert len(ProbeCache().entries()) == 2  # a new key, not a stale entry caught by its verification
    assert heavy.loss.__qualname__ == light.loss.__qualname__  # the same name: only the code differs
    assert (
        second.cached is False
        and second.micro_batch == _fresh(mlp(64), loss_fn=heavy.loss) < first.micro_batch
    )


class Copies(nn.Module):
    """Runs its input through the network ``copies`` times: a plain attribute that changes memory."""

    def __init__(self, copies: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.copies = copies
        self.net = mlp(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x] * self.copies))[: x.shape[0]]


def test_a_changed_module_attribute_is_probed_again() -> None:
    first = _probe(Copies(1))
    second = _probe(Copies(4))
    assert len(ProbeCache().entries()) == 2  # a new key, not a stale entry caught by its verification
    assert second.cached is False and second.micro_batch == _fresh(Copies(4)) < first.micro_batch


def test_an_optimizer_holding_fewer_parameters_is_probed_again() -> None:
    model = mlp(64)
    everything = torch.optim.Adam(model.parameters())
    first = _probe(model, optimizer=everything)
    head_only = torch.optim.Adam(model[2].parameters())  # less optimizer state: more samples fit
    second = _probe(model, optimizer=head_only)
    assert second.cached is False
    assert (
        second.micro_batch
        == _fresh(model, optimizer=torch.optim.Adam(model[2].parameters()))
        > first.micro_batch
    )


CLASS_IN_C = """
import json, sys, torch
import autobatch
from torch import nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 64), nn.Linear(64, 2)
    def forward(self, x):
        return self.b(torch.relu(self.a(torch.cat([x] * COPIES))))[: x.shape[0]]
g = torch.Generator().manual_seed(0)
data = torch.randn(512, 8, generator=g), torch.randint(0, 2, (512,), generator=g)
options = dict(memory_limit="96KiB", precision="fp32", device="cpu", cache=sys.argv[1] == "1")
r = autobatch.probe(Net(), data, **options)
print(json.dumps([r.micro_batch, r.cached]))
"""


@pytest.mark.slow
def test_a_class_with_no_source_file_is_keyed_by_its_bytecode(tmp_path: Path) -> None:
    """Classes defined in ``python -c`` (or a notebook) have no source to read, and still have code."""

    def run(copies: int, cache: bool = True) -> list[Any]:
        code = CLASS_IN_C.replace("COPIES", str(copies))
        env = {**os.environ, "AUTOBATCH_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-c", code, "1" if cache else "0"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    light = run(1)
    assert run(1) == [light[0], True]
    heavy = run(4)  # the class changed: probed again, and it holds fewer
    assert heavy[1] is False and heavy[0] < light[0]


def test_a_stale_entry_that_no_longer_fits_costs_one_trial_not_a_wrong_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _probe(mlp(64))
    (entry,) = ProbeCache().entries()
    data = json.loads(entry.path.read_text())
    data["result"]["micro_batch"] = data["result"]["max_fitting_batch"] = 500  # what no longer fits
    data["result"]["first_failure"] = 501
    entry.path.write_text(json.dumps(data))
    again = _probe(mlp(64))
    assert again.cached is False and again.micro_batch == first.micro_batch
    assert json.loads(entry.path.read_text())["result"]["micro_batch"] == first.micro_batch  # rewritten


# -- files that are not what they seem -----------------------------------------------------------------


def _entry_path(cache: ProbeCache) -> Path:
    return cache.path_for(cache_key(setup()))


def test_a_fifo_named_like_an_entry_is_never_opened() -> None:
    cache = ProbeCache()
    cache.directory.mkdir(parents=True)
    os.mkfifo(_entry_path(cache))  # opening it for reading would block until a writer comes
    assert one_warning(lambda: cache.get(cache_key(setup()))) is None
    assert "not a regular file" in str(one_warning.last)  # type: ignore[attr-defined]
    assert one_warning(cache.entries) == []
    assert cache.put(cache_key(setup()), made_result(), setup()) is not None  # replaced by a real entry
    assert cache.get(cache_key(setup())) is not None


def test_a_symlink_to_a_device_is_never_read() -> None:
    cache = ProbeCache()
    cache.directory.mkdir(parents=True)
    _entry_path(cache).symlink_to("/dev/zero")  # reading it would never end
    assert one_warning(lambda: cache.get(cache_key(setup()))) is None
    assert one_warning(cache.entries) == []


def test_an_oversized_file_is_not_read() -> None:
    cache = ProbeCache()
    cache.directory.mkdir(parents=True)
    _entry_path(cache).write_bytes(b'{"format": 1, ' + b" " * (MAX_FILE_BYTES + 10) + b"}")
    assert one_warning(lambda: cache.get(cache_key(setup()))) is None
    assert "more than a cache file holds" in str(one_warning.last)  # type: ignore[attr-defined]


def test_a_directory_named_like_an_entry_is_skipped_by_every_command() -> None:
    cache = ProbeCache()
    _entry_path(cache).mkdir(parents=True)
    assert one_warning(lambda: cache.get(cache_key(setup()))) is None
    assert one_warning(cache.entries) == []
    assert cache.clear() == 0


INVALID_RESULTS: dict[str, dict[str, Any]] = {
    "micro_batch 10**9": {"micro_batch": 10**9, "max_fitting_batch": 10**9},
    "micro above the largest fitting": {"micro_batch": 9},
    "micro_batch a string": {"micro_batch": "8"},
    "first failure below the largest fitting": {"first_failure": 3},
    "precision unknown": {"precision": "fp8"},
    "negative seconds": {"seconds": -1.0},
    "infinite bytes per sample": {"bytes_per_sample": float("inf")},
    "margin of 1": {"margin": 1.0},
    "cached a string": {"cached": "yes"},
    "capped by nonsense": {"capped_by": "moon"},
    "a trial fitted 'yes'": {"trials": [{"batch": 1, "fitted": "yes", "peak_bytes": 1, "seconds": 0.1}]},
    "a trial of batch 0": {"trials": [{"batch": 0, "fitted": True, "peak_bytes": 1, "seconds": 0.1}]},
    "a trial missing its batch": {"trials": [{"fitted": True, "peak_bytes": 1, "seconds": 0.1}]},
    "trials not a list": {"trials": {"batch": 1}},
}


@pytest.mark.parametrize("change", INVALID_RESULTS.values(), ids=INVALID_RESULTS.keys())
def test_a_schema_invalid_entry_is_corrupt_for_every_reader(change: dict[str, Any]) -> None:
    cache, fp = ProbeCache(), setup()
    path = cache.put(cache_key(fp), made_result(), fp)
    assert path is not None
    data = json.loads(path.read_text())
    data["result"].update(change)
    path.write_text(json.dumps(data))
    assert one_warning(lambda: cache.get(cache_key(fp))) is None
    assert one_warning(cache.entries) == []
    assert cache.put(cache_key(fp), made_result(), fp) is not None and cache.get(cache_key(fp)) is not None


def test_a_micro_batch_above_the_dataset_size_is_corrupt() -> None:
    cache, fp = ProbeCache(), setup(dataset_size=4)
    cache.put(cache_key(fp), made_result(micro=8), fp)
    assert one_warning(lambda: cache.get(cache_key(fp))) is None


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_honour_the_umask(umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = ProbeCache().put(cache_key(setup()), made_result(), setup())
    finally:
        os.umask(previous)
    assert path is not None and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# -- the key is never why a probe fails, and a big model's entry is read back (issue 18, defects 5, 6) -------


def _deep(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth):
        value = [value]
    return value


def _cyclic() -> list[Any]:
    value: list[Any] = [1, 2]
    value.append(value)
    return value


@pytest.mark.parametrize("held", [_cyclic, lambda: _deep(5000)], ids=["cyclic list", "list 5000 deep"])
def test_a_cyclic_or_deep_value_in_a_step_fn_closure_is_keyed(
    held: Callable[[], Any], no_warnings: None
) -> None:
    def make_step(value: Any) -> Callable[[nn.Module, Any], torch.Tensor]:
        return lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]) * (len(value) > 0)

    first = _probe(mlp(64), step_fn=make_step(held()))
    again = _probe(mlp(64), step_fn=make_step(held()))
    assert first.cached is False and again.cached is True and again.micro_batch == first.micro_batch


class _Unmaterialised(torch.Tensor):
    """A tensor subclass that refuses every query until it is materialised: reading its shape raises."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        raise RuntimeError("not materialised yet")


def test_a_key_that_cannot_be_computed_turns_the_cache_off_for_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("autobatch.cache.probestore._warned", set())
    pending = torch.zeros(4).as_subclass(_Unmaterialised)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) if pending is not None else out.sum()

    first = one_warning(lambda: _probe(mlp(64), loss_fn=loss))
    assert "the probe cache is off for this call" in one_warning.last.lower()  # type: ignore[attr-defined]
    assert "RuntimeError: not materialised yet" in one_warning.last  # type: ignore[attr-defined]
    assert first.cached is False and first.micro_batch == _fresh(mlp(64), loss_fn=loss)
    assert ProbeCache().entries() == []  # nothing stored under a key that does not describe the setup
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per cause and process: the next call only logs it
        again = _probe(mlp(64), loss_fn=loss)
    assert again.cached is False and again.micro_batch == first.micro_batch


class _Blocks(nn.Module):
    """``n`` cheap modules (identities, and frozen 1-by-1 linears the step skips) before a small head."""

    def __init__(self, n: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Identity() if i % 2 else nn.Linear(1, 1) for i in range(n))
        self.blocks.requires_grad_(False)
        self.head = mlp(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if isinstance(block, nn.Identity):
                x = block(x)
        return self.head(x)  # type: ignore[no-any-return]


def test_a_model_of_10000_modules_is_stored_small_and_read_back(no_warnings: None) -> None:
    first = _probe(_Blocks(10_000), memory_limit="16MiB")
    (entry,) = ProbeCache().entries()
    assert entry.size_bytes < 16 * 1024  # a few KiB: it was 2.3 MB, over the read cap, and never read back
    assert entry.model == "_Blocks"
    fp = json.loads(entry.path.read_text())["fingerprint"]
    assert fp["model"]["modules"] == 10_006 and fp["model"]["class"].endswith("._Blocks")
    again = _probe(_Blocks(10_000), memory_limit="16MiB")
    assert again.cached is True and again.micro_batch == first.micro_batch
    assert _probe(_Blocks(10_002), memory_limit="16MiB").cached is False  # two modules more: another key


class _SetsOnFirstForward(nn.Module):
    """Records what its first batch says, as Hugging Face models set ``config.problem_type``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = mlp(64)
        self.problem_type: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.problem_type is None:
            self.problem_type = "single_label_classification"
        return self.net(x)  # type: ignore[no-any-return]


def test_a_model_that_sets_an_attribute_in_its_first_forward_is_found_again(no_warnings: None) -> None:
    model = _SetsOnFirstForward()
    first = _probe(model)
    assert model.problem_type is not None and first.cached is False
    again = _probe(model)  # the same object, its attribute now set: found under the key as it is now
    assert again.cached is True and again.micro_batch == first.micro_batch
    assert _probe(_SetsOnFirstForward()).cached is True  # a fresh one, as in the next process


def test_an_entry_of_an_older_format_is_stale_not_corrupt(no_warnings: None) -> None:
    """After an upgrade, files of the older format are neither listed nor warned about; clear removes them."""
    cache, fp = ProbeCache(), setup()
    path = cache.put(cache_key(fp), made_result(), fp)
    assert path is not None
    data = json.loads(path.read_text())
    data["format"] = CACHE_FORMAT - 1
    path.write_text(json.dumps(data))
    assert cache.get(cache_key(fp)) is None and cache.entries() == []
    assert cache.clear() == 1 and not path.exists()
