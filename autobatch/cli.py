"""The command line: ``autobatch probe MODEL``, ``autobatch demo`` and ``autobatch cache`` (also
``python -m autobatch``).

A thin front over the public API: it resolves the specs, calls :func:`autobatch.probe` or
:func:`autobatch.fit` and renders the returned data with rich, or prints one JSON object for CI. With
``--json`` (or a ``--format`` export) stdout carries only that object and everything for people goes to
stderr, so ``FORCE_COLOR`` can never leak escape codes into a pipe.

Exit codes: 0 success; 1 an unexpected error; 2 bad usage (arguments, specs); 3 nothing fits, or the
micro-batch is below ``--min-batch`` (the CI gate).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch

import autobatch
from autobatch.cli_args import build_parser
from autobatch.cli_inputs import build_inputs
from autobatch.errors import NoBatchFitsError, UsageError
from autobatch.planner import Plan, plan, uniform_plan
from autobatch.session import check_device_available, default_device
from autobatch.validate import check_device

__all__ = ["EXIT_ERROR", "EXIT_NO_FIT", "EXIT_OK", "EXIT_USAGE", "JSON_SCHEMA_VERSION", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_FIT = 0, 1, 2, 3
JSON_SCHEMA_VERSION = 1
"""Version of the ``--json`` object's layout; bumped on any incompatible change."""


def _optimizer(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3)


def _plans(args: argparse.Namespace, micro: int) -> tuple[Plan | None, dict[str, int] | None]:
    target = args.target_batch if args.target_batch is not None else micro * args.world_size
    if args.target_batch is None and args.format == "text":
        return None, None
    training = plan(micro, target, args.world_size)
    config = (
        uniform_plan(micro, target, args.world_size).to_config(args.format) if args.format != "text" else None
    )
    return (training if args.target_batch is not None else None), config


def _progress(console: Any, enabled: bool) -> tuple[Any, Callable[[Any], None] | None]:
    """A spinner on stderr that names each trial as it completes (only on a terminal)."""
    if not enabled or not console.is_terminal:
        return None, None
    status = console.status("probing: warm-up step …")

    def on_trial(trial: Any) -> None:
        outcome = "fits" if trial.fitted else "[red]OOM[/]"
        status.update(f"probing: batch {trial.batch} {outcome} · next trial …")

    return status, on_trial


def _cmd_probe(args: argparse.Namespace, out: Any, err: Any) -> int:
    if args.target_batch is not None:
        plan(1, args.target_batch, args.world_size)  # an indivisible target fails before the probe runs
    model, data, options = build_inputs(args)
    device = (
        check_device_available(check_device(args.device, "device"), args.device)
        if args.device
        else default_device()
    )
    model.to(device)
    flags = {
        "precision": args.precision,
        "memory_limit": args.memory_limit,
        "max_batch": args.max_batch,
        "margin": args.margin,
        "multiple_of": args.multiple_of,
    }
    # Flags given on the command line win over the options a model factory's dict carries.
    options = {
        "precision": "auto",
        **options,
        **{k: v for k, v in flags.items() if v is not None},
        "device": device,
        "cache": not args.no_cache,
        "cache_dir": args.cache_dir,
    }
    if args.optimizer is not None or "optimizer" not in options:
        options["optimizer"] = _optimizer(args.optimizer or "adamw", model)
    status, on_trial = _progress(err, not args.no_progress)
    if status is not None:
        status.start()
    try:
        result = autobatch.probe(model, data, on_trial=on_trial, **options)
    finally:
        if status is not None:
            status.stop()
    training, config = _plans(args, result.micro_batch)
    below = args.min_batch is not None and result.micro_batch < args.min_batch
    shortfall = f"micro-batch {result.micro_batch} is below --min-batch {args.min_batch}" if below else None

    human = err if (args.json or args.format != "text") else out
    human.print(result)
    if training is not None:
        human.print(f"[bold]plan[/]: {training.describe()}", highlight=False)
    if config is not None and args.format != "text":
        human.print(f"[bold]{args.format} settings[/] (equal micro-batches): {config}", highlight=False)
    if shortfall:
        err.print(f"[red]{shortfall}[/]", highlight=False, soft_wrap=True)
    if args.json:
        payload = _probe_json(result, training, config, args)
        payload.update(
            ok=not below,
            exit_code=EXIT_NO_FIT if below else EXIT_OK,
            error_kind="below --min-batch" if below else None,
            error=shortfall,
        )
        _write_json(payload)
    elif config is not None:
        _write_json(config)
    return EXIT_NO_FIT if below else EXIT_OK


def _probe_json(
    result: autobatch.ProbeResult, training: Plan | None, config: dict[str, int] | None, args: Any
) -> dict[str, Any]:
    data = result.to_dict()
    fixed, per_sample = data.pop("fixed_bytes"), data.pop("bytes_per_sample")
    data["memory_model"] = (
        None if per_sample is None else {"fixed_bytes": fixed, "bytes_per_sample": per_sample}
    )
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "autobatch_version": autobatch.__version__,
        "torch_version": torch.__version__,
        **data,
        "min_batch": args.min_batch,
        "plan": training.to_dict() if training is not None else None,
        "config": {args.format: config} if config is not None else None,
    }


def _write_json(payload: dict[str, Any]) -> None:
    # Plain print, never rich: stdout must hold exactly this object, free of markup and escape codes.
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def _cmd_demo(args: argparse.Namespace, out: Any, err: Any) -> int:
    from autobatch.demo import DEMO_MEMORY_LIMIT, DigitsCNN, load_digits_data

    digits = load_digits_data(seed=args.seed)
    torch.manual_seed(args.seed)
    human = err if args.json else out
    limit = args.memory_limit or DEMO_MEMORY_LIMIT
    human.print(
        f"[bold]autobatch demo[/]: a CNN on scikit-learn's digits ({len(digits.train[1])} train, "
        f"{len(digits.test[1])} held out), target batch {args.target_batch}, emulated device of {limit}"
    )
    result = autobatch.fit(
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
        cache=not args.no_cache,
        cache_dir=args.cache_dir,
    )
    if result.probe is not None:
        human.print(result.probe)
    human.print(f"[bold]plan[/]: {result.plan.describe()}", highlight=False)
    human.print(result)
    if result.report is not None:
        human.print(f"[bold]held-out classification report[/] (epoch {result.epochs})")
        human.print(result.report.text, markup=False, highlight=False)
    if args.json:
        _write_json({"schema_version": JSON_SCHEMA_VERSION, **result.to_dict()})
    return EXIT_OK


def _cmd_cache(args: argparse.Namespace, out: Any, err: Any) -> int:
    from rich.table import Table

    from autobatch.cache import ProbeCache
    from autobatch.memory import format_bytes

    store = ProbeCache(args.cache_dir)
    if args.action == "clear":
        removed = store.clear()
        human = err if args.json else out
        human.print(f"removed {removed} cached probe result(s) from {store.directory}", highlight=False)
        if args.json:
            _write_json(
                {"schema_version": JSON_SCHEMA_VERSION, "directory": str(store.directory), "removed": removed}
            )
        return EXIT_OK
    entries = store.entries()
    if args.json:
        _write_json(
            {
                "schema_version": JSON_SCHEMA_VERSION,
                "directory": str(store.directory),
                "entries": [{**vars(e), "path": str(e.path)} for e in entries],
            }
        )
        return EXIT_OK
    table = Table(title="autobatch probe cache", title_justify="left")
    for column in ("created (UTC)", "model", "device", "dtype", "limit", "micro", "key"):
        table.add_column(column, justify="right" if column == "micro" else "left", no_wrap=True)
    for e in entries:
        limit = format_bytes(e.memory_limit) if e.memory_limit is not None else "–"
        table.add_row(
            e.created[:16].replace("T", " "),
            e.model,
            e.device,
            e.precision,
            limit,
            str(e.micro_batch),
            e.key[:8],
        )
    out.print(table)
    out.print(f"{len(entries)} result(s) in {store.directory}", highlight=False, soft_wrap=True)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from rich.console import Console

    args = build_parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    out, err = Console(), Console(stderr=True)
    as_json = bool(getattr(args, "json", False))
    command = {"probe": _cmd_probe, "demo": _cmd_demo, "cache": _cmd_cache}[args.command]
    failure: BaseException
    try:
        return command(args, out, err)
    except NoBatchFitsError as exc:
        code, kind, message = EXIT_NO_FIT, "no batch fits", str(exc)
    except UsageError as exc:  # a bad argument or spec; the message names the culprit
        code, kind, message = EXIT_USAGE, "error", str(exc)
    except Exception as exc:  # raised inside the user's model, data or loss: their bug, with its traceback
        code, kind, message = EXIT_ERROR, "unexpected error", f"{type(exc).__name__}: {exc}"
        failure = exc
    if code == EXIT_ERROR:
        if verbose:
            err.print("".join(traceback.format_exception(failure)), markup=False, highlight=False)
        else:
            message += " (run with -v for the traceback)"
    # One line, however narrow the terminal: CI logs are read with grep.
    err.print(f"{kind}: {message}", style="red", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        _write_json(
            {
                "schema_version": JSON_SCHEMA_VERSION,
                "ok": False,
                "exit_code": code,
                "error_kind": kind,
                "error": message,
            }
        )
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
