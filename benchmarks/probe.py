"""Probe accuracy and cost: ``autobatch.probe`` against an exhaustive search, and against the older search.

For each case (a model, its data, an optimizer and a memory limit) the exhaustive maximum is found by
trying every batch size from 1 up with ``autobatch.try_batch`` until the first that does not fit; then the
probe runs twice under the same limit: with its memory timelines (the default) and with the search it used
before them (``--old``: doubling, then a line through the measured peaks, then bisection). The table gives
both probes' micro-batch, optimizer steps, out-of-memory errors and samples of training work (every
trial's batch, the warm-up's included), the exhaustive search's, and the reserved peak the timeline model
predicted at the maximum next to the one measured there. Figures, not pass/fail: the project's targets are
the exact maximum at margin 0, at most 5 steps and 1 OOM on an ideal device (at most 2.5 × the maximum in
samples), at most 8 steps and 2 OOMs through the allocator model.

Run on a GPU by ``benchmarks/gpu.sh``, which runs ``pytest -m gpu`` and both benchmarks on CUDA.

Two devices are emulated on the CPU: ``ideal`` caps live tensor bytes, ``allocator`` caps reserved memory
through the model of CUDA's caching allocator; the limits are chosen so that the true maximum is about
``--targets``. With ``--device cuda`` the same models run on a GPU whose allocator is capped to each limit.

Run from the repository root: ``python benchmarks/probe.py [--targets 16 64] [--device cuda] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autobatch import probe, try_batch
from autobatch.options import Options
from autobatch.prober import Prober
from autobatch.session import resolve
from autobatch.units import format_bytes
from tests.models import CNN, MLP, case


@dataclass
class Case:
    """A model, its data, how to build its optimizer, and the true maxima its limits aim at."""

    name: str
    model: nn.Module
    data: Any
    size: int
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    targets: tuple[int, ...] = (16, 64)


def adam(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-3)


def _tensors(
    n: int, shape: tuple[int, ...], classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def ideal_cases() -> list[Case]:
    """The test models, and an MLP whose optimizer step dominates at small batches."""
    cases = [Case(name, *_unpack(case(name)), adam) for name in ("mlp", "cnn", "transformer")]
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    # Its optimizer step's peak is flat up to about 170 samples: limits below that hold the same maximum.
    cases.append(Case("mlp, optimizer-heavy", wide, _tensors(1024, (16,), 10), 1024, adam, (256, 512)))
    return cases


def allocator_cases() -> list[Case]:
    """Models large enough that the allocator's segments (2 and 20 MiB) matter."""
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )
    torch.manual_seed(0)
    cnn = CNN(channels=3, size=32, width=64)
    torch.manual_seed(0)
    deep = MLP(in_features=256, hidden=2048)
    # Reserved memory grows in segments: each limit holds a range of batches; targets far enough apart.
    return [
        Case("mlp 512-1024-1024", mlp, _tensors(2048, (512,), 10), 2048, adam, (16, 256)),
        Case("cnn, BatchNorm, 32×32", cnn, _tensors(512, (3, 32, 32), 10), 512, adam, (16, 64)),
        Case("mlp 256-2048-2048", deep, _tensors(1024, (256,), 10), 1024, adam, (16,)),
    ]


def _unpack(c: Any) -> tuple[nn.Module, Any, int]:
    return c.model, c.data, c.size


def limit_for(c: Case, target: int, options: dict[str, Any]) -> int:
    """A limit under which the true maximum is about ``target``: the step's peak there, measured roomily.

    Reserved memory is a step function of the batch, and the first step (which creates the optimizer's
    state among its activations) can need more than a steady one: the limit grows by 2 MiB until the
    smallest batch trains at all.
    """
    roomy = {**options, "memory_limit": "8GiB"}
    trial = try_batch(c.model, c.data, target, optimizer=c.optimizer(c.model), **roomy)
    reserved = options.get("emulation") == "allocator" or options["device"] == "cuda"
    peak = trial.reserved_bytes if reserved else trial.peak_bytes
    assert trial.fitted and peak is not None
    limit = int(peak)
    while not try_batch(
        c.model, c.data, 1, optimizer=c.optimizer(c.model), **{**options, "memory_limit": limit}
    ).fitted:
        limit += 2 << 20
    return limit


def exhaustive_max(c: Case, options: dict[str, Any]) -> tuple[int, int, float]:
    """Try b = 1, 2, ... until the first that does not fit: the maximum, the steps, the seconds."""
    gc.collect()
    gc.freeze()
    started = time.perf_counter()
    try:
        b = 1
        while b <= c.size and try_batch(c.model, c.data, b, optimizer=c.optimizer(c.model), **options).fitted:
            b += 1
    finally:
        gc.unfreeze()
    return b - 1, 2 * b, time.perf_counter() - started  # each try_batch is a warm-up and one trial


def run_probe(c: Case, options: dict[str, Any], strategy: str) -> dict[str, Any]:
    """One probe with ``strategy``, and the timeline model's prediction at the maximum it found."""
    Prober.strategy = strategy
    try:
        gc.collect()
        started = time.perf_counter()
        result = probe(c.model, c.data, optimizer=c.optimizer(c.model), cache=False, **options)
        seconds = time.perf_counter() - started
    finally:
        Prober.strategy = "timeline"
    floor = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in c.model.modules()) else 1
    measured = next(
        (
            t.reserved_bytes or t.peak_bytes
            for t in result.trials
            if t.batch == result.max_fitting_batch and t.fitted
        ),
        None,
    )
    return {
        "micro": result.micro_batch,
        "steps": result.optimizer_steps,
        "ooms": result.ooms,
        "samples": floor + sum(t.batch for t in result.trials),
        "seconds": seconds,
        "trials": [t.batch if t.fitted else -t.batch for t in result.trials],
        "measured_peak": measured,
    }


def predicted_peak(c: Case, options: dict[str, Any], batch: int) -> int | None:
    """The timeline model's peak at ``batch`` (reserved bytes where the allocator counts), from two trials."""
    session = resolve(c.model, c.data, Options.parse("probe", {**options, "optimizer": c.optimizer(c.model)}))
    with session.start():
        prober = Prober(session)
        with prober.restoring(), prober.warm():
            low = max(2, prober.floor)  # the probe's own two small trials
            prober.trial(low)
            prober.trial(low + 1)
        model = prober.predictor()
    return None if model is None else model.peak(batch)


def measure(c: Case, mode: str, target: int, device: str) -> dict[str, Any]:
    options: dict[str, Any] = {"precision": "fp32", "device": device}
    if device == "cpu":
        options["emulation"] = mode
    c.model.to(device)
    options["memory_limit"] = limit_for(c, target, options)
    exact, exhaustive_steps, exhaustive_seconds = exhaustive_max(c, options)
    new = run_probe(c, options, "timeline")
    old = run_probe(c, options, "bisect")
    return {
        "model": c.name,
        "mode": mode if device == "cpu" else "cuda",
        "limit": options["memory_limit"],
        "true_max": exact,
        "new": new,
        "old": old,
        "new_exact": new["micro"] == exact,
        "old_exact": old["micro"] == exact,
        "exhaustive_steps": exhaustive_steps,
        "exhaustive_seconds": exhaustive_seconds,
        "predicted_peak": predicted_peak(c, options, exact) if exact else None,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | device | limit | true max | probe | steps | OOMs | samples | old probe | old steps "
        "| old OOMs | old samples | exhaustive steps | predicted peak | measured peak "
        "| new trials (−: OOM) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        new, old = r["new"], r["old"]
        predicted = format_bytes(r["predicted_peak"]) if r["predicted_peak"] else "–"
        measured = format_bytes(new["measured_peak"]) if new["measured_peak"] else "–"
        lines.append(
            f"| {r['model']} | {r['mode']} | {format_bytes(r['limit'])} | {r['true_max']} "
            f"| {new['micro']}{'' if r['new_exact'] else ' ✗'} | {new['steps']} | {new['ooms']} "
            f"| {new['samples']} | {old['micro']}{'' if r['old_exact'] else ' ✗'} | {old['steps']} "
            f"| {old['ooms']} | {old['samples']} "
            f"| {r['exhaustive_steps']} | {predicted} | {measured} | {' '.join(map(str, new['trials']))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--targets", type=int, nargs="+", help="approximate true maxima (default: per case)")
    parser.add_argument("--device", default="cpu", help="cpu (emulated, both modes) or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    modes = (
        [("ideal", ideal_cases), ("allocator", allocator_cases)]
        if args.device == "cpu"
        else [("cuda", allocator_cases)]
    )
    rows = [
        measure(c, mode, t, args.device)
        for mode, cases in modes
        for c in cases()
        for t in args.targets or c.targets
    ]
    if args.json:
        print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}, indent=2))
        return
    print(markdown(rows))
    for mode in {r["mode"] for r in rows}:
        mine = [r for r in rows if r["mode"] == mode]
        print(
            f"\n{mode}: timeline search {sum(r['new_exact'] for r in mine)}/{len(mine)} exact, at most "
            f"{max(r['new']['steps'] for r in mine)} steps, {max(r['new']['ooms'] for r in mine)} OOMs and "
            f"{max(r['new']['samples'] / max(r['true_max'], 1) for r in mine):.2f} × the maximum in samples; "
            f"older search {sum(r['old_exact'] for r in mine)}/{len(mine)} exact, at most "
            f"{max(r['old']['steps'] for r in mine)} steps and {max(r['old']['ooms'] for r in mine)} OOMs."
        )
    print(
        f"\ntotal {time.perf_counter() - started:.0f} s (torch {torch.__version__}, {args.threads} thread(s))"
    )


if __name__ == "__main__":
    main()
