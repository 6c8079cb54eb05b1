"""``autobatch demo``: probe, plan, train and evaluate a small CNN on bundled data, on an emulated device."""

from __future__ import annotations

import argparse
import warnings

from autobatch.cli.io import Streams, console

__all__ = ["run"]


def run(args: argparse.Namespace, streams: Streams) -> int:
    """Probe, plan, train and evaluate the demo, printing each stage as it comes (the README's order);
    ``--json`` adds the fit result as one object."""
    import dataclasses

    import torch

    import autobatch
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
    model = DigitsCNN()
    device = {"memory_limit": limit, "device": "cpu"}
    cache = {k: getattr(args, k) for k in ("cache", "cache_dir") if getattr(args, k) is not None}
    # The probe first, as fit would run it (capped at the target batch), so that it is shown before the
    # training it decides; fit then trains with its micro-batch.
    probed = autobatch.probe(model, digits.train, max_batch=args.target_batch, **device, **cache)
    human.print(probed)
    if probed.cached:
        human.print(
            "This micro-batch came from the probe cache (a result stored by an earlier run of the same "
            "setup), verified by a few training steps; run with --no-cache to probe afresh.",
            style="dim",
        )
    planned = autobatch.plan(probed.micro_batch, args.target_batch)
    human.print(f"[bold]plan[/]: {planned.describe()}", highlight=False)
    if planned.accumulation_steps > 1:
        human.print(
            f"About BatchNorm: the CNN normalises each micro-batch of at most {planned.micro_batch} "
            f"samples on its own, not all {planned.effective_batch} of a step at once. The gradients are "
            f"exactly those of a batch of {planned.effective_batch}; the running statistics BatchNorm "
            "keeps for evaluation come from the smaller micro-batches. GroupNorm or LayerNorm have no such "
            "difference.",
            style="dim",
        )
    with warnings.catch_warnings():
        # The demo says what BatchNorm over micro-batches means above, in words, instead.
        warnings.filterwarnings("ignore", message=r".*BatchNorm layer\(s\) compute batch statistics")
        result = autobatch.fit(
            model,
            digits.train,
            target_batch=args.target_batch,
            micro_batch=probed.micro_batch,
            epochs=args.epochs,
            eval_data=digits.test,
            target_names=digits.target_names,
            seed=args.seed,
            progress=False if args.json else None,
            **device,
        )
    result = dataclasses.replace(result, probe=probed, seconds=result.seconds + probed.seconds)
    human.print(result)
    if result.report is not None:
        human.print(f"[bold]held-out classification report[/] (epoch {result.epochs})")
        human.print(result.report.text, markup=False, highlight=False)
    if args.json:
        streams.write_json({"schema_version": JSON_SCHEMA_VERSION, **result.to_dict()})
    return 0
