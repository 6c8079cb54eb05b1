"""``autobatch predict MODEL --gpu NAME``: the largest micro-batch on a card this machine does not have.

The same contract as ``autobatch probe`` (:mod:`autobatch.cli.probe`): a table for people, or with
``--json`` one JSON object whose fields are the probe's plus ``predicted``, ``gpu``, ``budget_bytes``,
``kernels`` and ``prediction_notes``; exit 3 when nothing fits or the micro-batch is below ``--min-batch``
(a CI gate for a card: "does this change still fit the T4?"). The model stays where its spec builds it
(the CPU, or the meta device): a prediction reads shapes only.
"""

from __future__ import annotations

import argparse
from typing import Any

from autobatch.cli.io import Streams, console
from autobatch.cli.parser import flag_fields
from autobatch.cli.probe import check_format, optimizer_for, report
from autobatch.planner import plan

__all__ = ["run"]


def _options(args: argparse.Namespace, factory: dict[str, Any], model: Any) -> dict[str, Any]:
    """The prediction's options: flags given on the command line, then the factory's dict, then defaults."""
    flags = {
        f.name: getattr(args, f.name) for f in flag_fields("predict") if getattr(args, f.name) is not None
    }
    options = {k: v for k, v in factory.items() if k not in ("device", "cache", "cache_dir")}
    options.update(flags)
    if args.optimizer is not None or "optimizer" not in options:
        options["optimizer"] = optimizer_for(args.optimizer or "adamw", model)
    return options


def run(args: argparse.Namespace, streams: Streams) -> int:
    """Predict, render the result, and exit 3 when it is below ``--min-batch``."""
    check_format(args)  # before torch is imported: a usage error answers at once
    from autobatch import predict
    from autobatch.cli.inputs import build_inputs

    if args.target_batch is not None:
        plan(1, args.target_batch, args.world_size)  # an indivisible target fails before the prediction
    model, data, factory = build_inputs(args)
    options = _options(args, factory, model)
    err = console(streams.stderr)
    status = err.status(f"predicting for {args.gpu or args.memory_limit} …") if not args.no_progress else None
    if status is not None and err.is_terminal:
        status.start()
    try:
        result = predict(model, data, **options)
    finally:
        if status is not None and err.is_terminal:
            status.stop()
    return report(args, streams, result)
