"""``autobatch demo``: probe, plan, train and evaluate a small CNN on bundled data, on an emulated device."""

from __future__ import annotations

import argparse
import warnings

from autobatch.cli.io import Streams, console

__all__ = ["run"]


def run(args: argparse.Namespace, streams: Streams) -> int:
    """Train the demo and print what each stage found; ``--json`` adds the fit result as one object."""
    import torch

    from autobatch.api import fit
    from autobatch.cli import JSON_SCHEMA_VERSION
    from autobatch.demo import DigitsCNN, load_digits_data
    from autobatch.units import format_bytes, parse_memory_limit

    limit = int(parse_memory_limit(args.memory_limit, name="--memory-limit") or 0)  # a string is never None
    human = console(streams.people)
    digits = load_digits_data(seed=args.seed)
    torch.manual_seed(args.seed)
    human.print(
        f"[bold]autobatch demo[/]: a CNN on scikit-learn's digits ({len(digits.train[1])} train, "
        f"{len(digits.test[1])} held out), target batch {args.target_batch}, on an emulated device of "
        f"{format_bytes(limit)}",  # as every size autobatch prints, e.g. the probe's limit below
        highlight=False,
    )
    options = {k: getattr(args, k) for k in ("cache", "cache_dir") if getattr(args, k) is not None}
    with warnings.catch_warnings():
        # The demo says what BatchNorm over micro-batches means below, in words, instead.
        warnings.filterwarnings("ignore", message=r".*BatchNorm layer\(s\) compute batch statistics")
        result = fit(
            DigitsCNN(),
            digits.train,
            target_batch=args.target_batch,
            epochs=args.epochs,
            eval_data=digits.test,
            target_names=digits.target_names,
            memory_limit=limit,
            device="cpu",
            seed=args.seed,
            progress=False if args.json else None,
            **options,
        )
    if result.probe is not None:
        human.print(result.probe)
        if result.probe.cached:
            human.print(
                "This micro-batch came from the probe cache (a result stored by an earlier run of the same "
                "setup) and was confirmed by one training step; run with --no-cache to probe afresh.",
                style="dim",
            )
    human.print(f"[bold]plan[/]: {result.plan.describe()}", highlight=False)
    if result.plan.accumulation_steps > 1:
        human.print(
            f"About BatchNorm: the CNN normalises each micro-batch of at most {result.plan.micro_batch} "
            f"samples on its own, not all {result.plan.effective_batch} of a step at once. The gradients are "
            f"exactly those of a batch of {result.plan.effective_batch}; the running statistics BatchNorm "
            "keeps for evaluation come from the smaller micro-batches. GroupNorm or LayerNorm have no such "
            "difference.",
            style="dim",
        )
    human.print(result)
    if result.report is not None:
        human.print(f"[bold]held-out classification report[/] (epoch {result.epochs})")
        human.print(result.report.text, markup=False, highlight=False)
    if args.json:
        streams.write_json({"schema_version": JSON_SCHEMA_VERSION, **result.to_dict()})
    return 0
