"""Padded text: the probe's mixed case, and how training backs off when a padded batch does not fit.

A batch of the longest samples alone needs less memory than one that also holds a short sample: collation
pads the short one, and the model then builds a ``(batch, length, length)`` attention bias (BERT's 4-D
mask). The probe searches the longest batches, confirms its answer on the mixed case (the longest but one
with the shortest) and searches the mixed case below it when that does not fit. Three tables, per model,
memory cap and precision, on an emulated device of live tensor bytes (``emulation="ideal"``):

1. **Probe.** The longest-only answer (the largest fitted trial of the longest case: what the probe said
   before it looked at the mixed case), the probe's micro-batch, the exhaustive maximum (the largest batch
   for which ``autobatch.try_batch``, which checks both cases, fits), and the probe's steps, OOMs, seconds.
2. **Training.** ``autobatch.fit(micro_batch=X, target_batch=X)`` for at least 20 optimizer steps, with X
   the longest-only answer and X the probe's micro-batch: the out-of-memory back-offs and what they cost.
3. **Back-off policy.** From the longest-only answer, with ``target_batch`` = ``POLICY_STEPS`` × X (at
   ``target_batch`` = X the planner splits any size below X into the same two even chunks, and the policies
   look alike): the measured back-off (the failed micro-batch's peak measured again without the limit,
   through a line from the step's fixed bytes), the back-off from the error's lower bound alone (nothing
   roomier to measure on: CUDA at its full capacity), and halving (neither measure nor bound).

Models: :class:`tests.text_models.PaddedEncoder` on ``text_samples()``, and the tiny BERT classifier of
:mod:`tests.hf_fixtures` with ``DataCollatorWithPadding`` where transformers imports (skipped otherwise).
Figures, not pass/fail.

Run from the repository root: ``python benchmarks/text.py [--threads 1] [--json]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autobatch
import autobatch.step.transaction
from autobatch.memory.device import DeviceMemory
from autobatch.result import FitResult
from tests.text_models import PaddedEncoder, collate, text_samples

MIN_STEPS = 20
"""Each training run has at least this many optimizer steps (whole epochs)."""

POLICY_STEPS = 4
"""The back-off policies train with ``target_batch`` of this many micro-batches of the longest-only answer."""


@dataclass
class Case:
    """A model (built fresh for every run), its data, and the caps to run it at."""

    name: str
    make_model: Callable[[], nn.Module]
    make_data: Callable[[], DataLoader[Any]]
    size: int
    caps: tuple[tuple[str, str], ...]
    """``(memory_limit, precision)`` pairs."""


def encoder_case() -> Case:
    samples = text_samples()
    return Case(
        "PaddedEncoder",
        PaddedEncoder,
        lambda: DataLoader(samples, collate_fn=collate),  # type: ignore[arg-type]
        len(samples),
        # The mixed case costs a (batch, 96, 96) bias: most in bf16, where the bias is promoted; in fp32
        # at 4 MiB it fits inside what the longest batch's peak holds elsewhere.
        (
            ("6MiB", "bf16"),
            ("7.8MiB", "bf16"),
            ("10MiB", "bf16"),
            ("6MiB", "fp32"),
            ("10MiB", "fp32"),
            ("4MiB", "fp32"),
        ),
    )


def bert_case() -> Case | None:
    """The tiny BERT with ``DataCollatorWithPadding``; ``None`` where transformers does not import."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from tests import hf_fixtures as hf

    samples = hf.classification_samples()
    return Case(
        "tiny BERT",
        hf.bert_classifier,
        lambda: hf.loader(samples, hf.padding_collator()),
        len(samples),
        # Only 27 samples have 128 tokens: from a batch of 28 on the longest case is padded too.
        (("20MiB", "bf16"), ("20MiB", "fp32"), ("40MiB", "bf16")),
    )


def options(cap: str, precision: str) -> dict[str, Any]:
    return {"memory_limit": cap, "emulation": "ideal", "precision": precision, "device": "cpu"}


def exhaustive_max(c: Case, opts: dict[str, Any], upto: int) -> tuple[int, bool]:
    """The largest b in ``1..upto`` whose ``try_batch`` fits (both cases), and whether the fitting sizes
    are one run from 1 (every size below the largest fits too)."""
    fits = [
        b
        for b in range(1, min(upto, c.size) + 1)
        if autobatch.try_batch(c.make_model(), c.make_data(), b, **opts).fitted
    ]
    best = max(fits, default=0)
    return best, fits == list(range(1, best + 1))


def probe_row(c: Case, cap: str, precision: str) -> dict[str, Any]:
    opts = options(cap, precision)
    started = time.perf_counter()
    result = autobatch.probe(c.make_model(), c.make_data(), cache=False, **opts)
    seconds = time.perf_counter() - started
    longest = max((t.batch for t in result.trials if t.case == "longest" and t.fitted), default=0)
    # Past the longest-only answer its longest batch does not fit, so try_batch cannot either.
    exact, monotone = exhaustive_max(c, opts, longest + 1)
    return {
        "model": c.name,
        "cap": cap,
        "precision": precision,
        "longest_only": longest,
        "micro": result.micro_batch,
        "true_max": exact,
        "monotone": monotone,
        "steps": result.optimizer_steps,
        "ooms": result.ooms,
        "seconds": seconds,
        "trials": [(t.batch if t.fitted else -t.batch, t.case) for t in result.trials],
    }


@contextlib.contextmanager
def policy(name: str) -> Iterator[None]:
    """``measured``: the code as it is; ``bound``: nothing roomier to measure on, the error's lower bound
    steers; ``halving``: neither, the loop halves."""
    with contextlib.ExitStack() as stack:
        if name in ("bound", "halving"):
            stack.enter_context(mock.patch.object(DeviceMemory, "roomy", lambda self: None))
        if name == "halving":
            stack.enter_context(
                mock.patch.object(autobatch.step.transaction, "demand_bytes", lambda exc: None)
            )
        yield


def train(
    c: Case, cap: str, precision: str, micro: int, how: str = "measured", target: int | None = None
) -> dict[str, Any]:
    """``fit`` from ``micro_batch=micro`` with ``target_batch=target`` (default: ``micro``), for whole
    epochs of at least ``MIN_STEPS`` optimizer steps."""
    target = target or micro
    epochs = math.ceil(MIN_STEPS / math.ceil(c.size / target))
    with policy(how):
        result: FitResult = autobatch.fit(
            c.make_model(),
            c.make_data(),
            target_batch=target,
            micro_batch=micro,
            epochs=epochs,
            seed=0,
            progress=False,
            **options(cap, precision),
        )
    return {
        "micro": micro,
        "target": target,
        "policy": how,
        "steps": result.optimizer_steps,
        "backoffs": [(b.from_micro, b.to_micro) for b in result.backoffs],
        "final_chunks": list(result.final_plan.chunks),
        "final_micro": result.final_plan.micro_batch,
        "samples": result.samples,
        "train_seconds": result.train_seconds,
        "samples_s": result.samples_per_second,
    }


def _sequence(backoffs: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}→{b}" for a, b in backoffs) or "–"


def _chunks(t: dict[str, Any]) -> str:
    return "+".join(map(str, t["final_chunks"]))


def _label(r: dict[str, Any]) -> str:
    return f"{r['model']} {r['cap']} {r['precision']}"


def _setup(r: dict[str, Any]) -> str:
    return f"{r['model']} | {r['cap']} | {r['precision']}"


def probe_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | cap | precision | longest-only | probe micro-batch | true max | steps | OOMs | probe s "
        "| trials (−: OOM; m: mixed) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        exact = "" if r["micro"] == r["true_max"] else " ✗"
        true_max = f"{r['true_max']}{'' if r['monotone'] else ' (not monotone)'}"
        trials = " ".join(f"{b}{'m' if case == 'mixed' else ''}" for b, case in r["trials"])
        lines.append(
            f"| {_setup(r)} | {r['longest_only']} | {r['micro']}{exact} | {true_max} | {r['steps']} "
            f"| {r['ooms']} | {r['seconds']:.2f} | {trials} |"
        )
    return "\n".join(lines)


def training_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | cap | precision | X from | X | steps | back-offs | sequence | final micro-batch "
        "| final chunks | train s | samples/s |",
        "|---|---:|---|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for r in rows:
        for label, t in (("longest-only", r["before"]), ("probe", r["after"])):
            lines.append(
                f"| {_setup(r)} | {label} | {t['micro']} | {t['steps']} | {len(t['backoffs'])} "
                f"| {_sequence(t['backoffs'])} | {t['final_micro']} | {_chunks(t)} "
                f"| {t['train_seconds']:.2f} | {t['samples_s']:,.0f} |"
            )
    return "\n".join(lines)


POLICIES = {
    "measured": "measured (current)",
    "bound": "error's lower bound only",
    "halving": "halving",
}


def policy_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | cap | precision | from | target | back-off | back-offs | sequence | final chunks "
        "| steps | train s | samples/s |",
        "|---|---:|---|---:|---:|---|---:|---|---|---:|---:|---:|",
    ]
    for r in rows:
        for how, t in r["policies"].items():
            lines.append(
                f"| {_setup(r)} | {t['micro']} | {t['target']} | {POLICIES[how]} | {len(t['backoffs'])} "
                f"| {_sequence(t['backoffs'])} | {_chunks(t)} | {t['steps']} | {t['train_seconds']:.2f} "
                f"| {t['samples_s']:,.0f} |"
            )
    return "\n".join(lines)


def readings(probes: list[dict[str, Any]], trainings: list[dict[str, Any]]) -> tuple[str, str, str]:
    gap = [r for r in probes if r["longest_only"] > r["true_max"]]
    exact = sum(r["micro"] == r["true_max"] for r in probes)
    above = ", ".join(str(r["longest_only"] - r["true_max"]) for r in gap)
    probe = (
        f"The probe's micro-batch is the exhaustive maximum in {exact}/{len(probes)} setups; the "
        f"longest-only answer is above it in {len(gap)} (by {above}); at most "
        f"{max(r['steps'] for r in probes)} steps and {max(r['ooms'] for r in probes)} OOMs a probe."
    )
    before = sum(bool(r["before"]["backoffs"]) for r in trainings)
    after = sum(bool(r["after"]["backoffs"]) for r in trainings)
    landed = sum(
        r["before"]["final_micro"] == r["after"]["micro"] for r in trainings if r["before"]["backoffs"]
    )
    slower = [
        r["before"]["samples_s"] / r["after"]["samples_s"] for r in trainings if r["before"]["backoffs"]
    ]
    cost = f", at a median × {statistics.median(slower):.2f} of its samples/s" if slower else ""
    training = (
        f"Trained at the longest-only answer, {before}/{len(trainings)} setups back off "
        f"({landed} of them end at the probe's micro-batch{cost}); at the probe's micro-batch "
        f"{after}/{len(trainings)} do."
    )
    parts = []
    compared = [r for r in trainings if "policies" in r]
    for how in POLICIES:
        runs = [r["policies"][how] for r in compared]
        offs = sum(len(t["backoffs"]) for t in runs)
        under = [
            _label(r) for r, t in zip(compared, runs, strict=True) if t["final_micro"] < r["after"]["micro"]
        ]
        ratio = statistics.median(
            t["samples_s"] / r["policies"]["measured"]["samples_s"]
            for r, t in zip(compared, runs, strict=True)
        )
        below = f" ({'; '.join(under)})" if 0 < len(under) < len(runs) else ""
        parts.append(
            f"{POLICIES[how]}: {offs} back-offs in {len(runs)} runs, {len(under)} ending below the probe's "
            f"size{below}, median samples/s × {ratio:.2f} of measured"
        )
    policies = "; ".join(parts) + "."
    return probe, training, policies


def measure(c: Case) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    probes, trainings = [], []
    cap, precision = c.caps[0]
    autobatch.try_batch(c.make_model(), c.make_data(), 2, **options(cap, precision))  # warm, untimed
    for cap, precision in c.caps:
        row = probe_row(c, cap, precision)
        probes.append(row)
        before = train(c, cap, precision, row["longest_only"])
        after = before if row["micro"] == row["longest_only"] else train(c, cap, precision, row["micro"])
        training: dict[str, Any] = {**{k: row[k] for k in ("model", "cap", "precision")}}
        training.update(before=before, after=after)
        if before["backoffs"]:  # the policies differ only where training backs off
            target = POLICY_STEPS * row["longest_only"]
            training["policies"] = {
                how: train(c, cap, precision, row["longest_only"], how, target) for how in POLICIES
            }
        trainings.append(training)
    return probes, trainings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of tables")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("autobatch").setLevel(logging.ERROR)  # the back-offs' warnings: counted, not shown
    started = time.perf_counter()
    cases = [encoder_case()]
    bert = bert_case()
    skipped = None
    if bert is None:
        skipped = "tiny BERT skipped: transformers does not import (pip install -e '.[hf]')"
    else:
        cases.append(bert)
    probes: list[dict[str, Any]] = []
    trainings: list[dict[str, Any]] = []
    for c in cases:
        p, t = measure(c)
        probes += p
        trainings += t
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"probe": probes, "training": trainings, "skipped": skipped, "seconds": seconds}))
        return
    try:
        import transformers

        hf = f"transformers {transformers.__version__}"
    except ImportError:
        hf = "no transformers"
    print(
        f"torch {torch.__version__}, {hf}, {args.threads} thread(s); {platform.machine()} CPU, "
        f"{os.cpu_count()} core(s), emulated device (ideal: live tensor bytes capped); training runs "
        f"≥ {MIN_STEPS} optimizer steps of target_batch = micro_batch = X"
    )
    if skipped:
        print(f"\n{skipped}")
    probe_reading, training_reading, policy_reading = readings(probes, trainings)
    print("\n### Probe\n")
    print(probe_table(probes))
    print(f"\n{probe_reading}")
    print("\n### Training at the longest-only answer and at the probe's\n")
    print(training_table(trainings))
    print(f"\n{training_reading}")
    print(f"\n### Back-off policy, from the longest-only answer X, target_batch = {POLICY_STEPS}·X\n")
    print(policy_table([r for r in trainings if "policies" in r]))
    print(f"\n{policy_reading}")
    print(f"\ntotal {seconds:.0f} s")


if __name__ == "__main__":
    main()
