"""Probe accuracy and cost: ``autobatch.probe`` against an exhaustive search, on the emulated CPU device.

For each of the three test models (an MLP, a CNN with BatchNorm and Dropout, a Transformer on
variable-length sequences; see ``tests/models.py``) at two memory limits, the exhaustive maximum is found
by trying every batch size from 1 up with ``autobatch.probe.try_batch`` until the first that does not fit;
then the probe runs once under the same limit. The table shows both maxima, their ratio, the training
steps and out-of-memory errors the probe needed, and its wall time. Figures, not pass/fail: the project's
targets are an exact result, at most 12 steps and at most 3 OOMs.

The limits are chosen per model so that the true maximum is about ``--targets`` (16 and 64 by default).
Torch runs on one thread (``--threads``): the models are tiny, and more threads only contend.

Run from the repository root: ``python benchmarks/probe.py [--targets 16 64] [--json]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autobatch import probe, try_batch
from autobatch.units import format_bytes
from tests.models import case, limit_for

MODELS = ("mlp", "cnn", "transformer")


def exhaustive_max(model: torch.nn.Module, data: Any, size: int, **options: Any) -> int:
    """Try b = 1, 2, ... until the first batch that does not fit; the heap is frozen to skip gc cost."""
    gc.collect()
    gc.freeze()
    try:
        b = 1
        while b <= size and try_batch(model, data, b, **options).fitted:
            b += 1
    finally:
        gc.unfreeze()
    return b - 1


def measure(name: str, target: int, optimizer: str, precision: str) -> dict[str, Any]:
    c = case(name)
    options: dict[str, Any] = {"optimizer": c.optimizer(optimizer), "precision": precision}
    options["memory_limit"] = limit_for(c.model, c.data, target, **options)
    started = time.perf_counter()
    exact = exhaustive_max(c.model, c.data, c.size, **options)
    exhaustive_seconds = time.perf_counter() - started
    gc.collect()
    started = time.perf_counter()
    result = probe(c.model, c.data, cache=False, **options)  # a benchmark measures, never reuses
    seconds = time.perf_counter() - started
    return {
        "model": name,
        "optimizer": optimizer,
        "precision": precision,
        "memory_limit": options["memory_limit"],
        "true_max": exact,
        "probe": result.micro_batch,
        "ratio": result.micro_batch / exact if exact else None,
        "exact": result.micro_batch == exact and result.first_failure == exact + 1,
        "steps": result.optimizer_steps,
        "ooms": result.ooms,
        "trials": [t.batch if t.fitted else -t.batch for t in result.trials],
        "probe_seconds": seconds,
        "exhaustive_steps": 2 * (exact + 1),
        "exhaustive_seconds": exhaustive_seconds,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | optimizer | precision | limit | true max | probe | ratio | steps | OOMs | probe s "
        "| exhaustive s | trials (−: OOM) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['precision']} | {format_bytes(r['memory_limit'])} "
            f"| {r['true_max']} | {r['probe']} | {r['ratio']:.3f} | {r['steps']} | {r['ooms']} "
            f"| {r['probe_seconds']:.2f} | {r['exhaustive_seconds']:.1f} "
            f"| {' '.join(map(str, r['trials']))} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--targets", type=int, nargs="+", default=[16, 64], help="approximate true maxima")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    rows = [
        measure(name, target, args.optimizer, args.precision) for name in MODELS for target in args.targets
    ]
    if args.json:
        print(json.dumps({"rows": rows, "seconds": time.perf_counter() - started}, indent=2))
        return
    print(markdown(rows))
    exact = sum(r["exact"] for r in rows)
    print(
        f"\n{exact}/{len(rows)} exact; at most {max(r['steps'] for r in rows)} steps and "
        f"{max(r['ooms'] for r in rows)} OOMs per probe; total {time.perf_counter() - started:.0f} s "
        f"(torch {torch.__version__}, {args.threads} thread(s))."
    )


if __name__ == "__main__":
    main()
