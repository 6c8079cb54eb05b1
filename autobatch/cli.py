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
from autobatch.cli_inputs import build_inputs, positive_int
from autobatch.errors import NoBatchFitsError
from autobatch.plan import CONFIG_FORMATS, Plan, plan, uniform_plan
from autobatch.validate import default_device, parse_device

__all__ = ["EXIT_ERROR", "EXIT_NO_FIT", "EXIT_OK", "EXIT_USAGE", "JSON_SCHEMA_VERSION", "main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NO_FIT = 0, 1, 2, 3
JSON_SCHEMA_VERSION = 1
"""Version of the ``--json`` object's layout; bumped on any incompatible change."""

EXAMPLES = """\
examples:
  autobatch probe torchvision.models:resnet18 --input-shape 3,224,224 --num-classes 1000 \\
      --memory-limit 8GiB --target-batch 256
  autobatch probe models.py:build --data data.py:train_set --precision bf16 --json
  autobatch probe mypkg.lm:make_model --seq-len 512 --vocab 32000 --format hf --target-batch 64
  autobatch probe mypkg.nets:Net --input-shape 3,64,64 --min-batch 16 --json   # CI gate: exit 3 below 16
  autobatch demo
exit codes: 0 ok · 1 unexpected error · 2 usage or spec error · 3 nothing fits or below --min-batch
"""


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
    device = parse_device(args.device) if args.device else default_device()
    model.to(device)
    options = {
        "precision": args.precision,
        "memory_limit": args.memory_limit,
        "device": device,
        "max_batch": args.max_batch,
        "margin": args.margin,
        "multiple_of": args.multiple_of,
        **options,
    }
    options.setdefault("optimizer", _optimizer(args.optimizer, model))
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
        human.print(f"[red]{shortfall}[/]", highlight=False)
    if args.json:
        payload = _probe_json(result, training, config, args)
        payload.update(ok=not below, exit_code=EXIT_NO_FIT if below else EXIT_OK, error=shortfall)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobatch",
        description="Find the largest micro-batch that fits, and train at any target batch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autobatch {autobatch.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the probe's steps; tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{probe,demo}")

    p = sub.add_parser(
        "probe",
        help="probe the largest micro-batch of a model",
        description="Run the real training step at growing batch sizes and report the largest that fits.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        help="package.module:attr or path/to/file.py:attr of an nn.Module, or of a zero-argument "
        "factory returning a module, (model, data), or a dict with 'model', 'data' and probe options",
    )
    inputs = p.add_argument_group("data (one of)")
    inputs.add_argument("--data", help="spec of a Dataset, DataLoader, tensors (X, y), or a factory of one")
    inputs.add_argument("--input-shape", help="random inputs of this per-sample shape, e.g. 3,224,224")
    inputs.add_argument("--seq-len", type=positive_int, help="random token sequences of this length")
    inputs.add_argument("--vocab", type=positive_int, help="vocabulary size of the random tokens")
    inputs.add_argument(
        "--num-classes", "--classes", type=positive_int, help="classes of the random labels (10 for images)"
    )
    inputs.add_argument("--samples", type=positive_int, default=4096, help="random samples (4096)")
    run = p.add_argument_group("training step")
    run.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    run.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    run.add_argument("--memory-limit", help="e.g. 8GiB: caps the CUDA allocator; the CPU emulates a device")
    run.add_argument("--device", help="cuda, cuda:1, cpu … (default: CUDA when available)")
    result = p.add_argument_group("result")
    result.add_argument("--target-batch", type=positive_int, help="plan accumulation for this batch")
    result.add_argument("--world-size", type=positive_int, default=1, help="data-parallel ranks (1)")
    result.add_argument("--max-batch", type=positive_int, help="never report more than this")
    result.add_argument("--margin", type=float, default=0.0, help="fraction of the maximum to leave free")
    result.add_argument("--multiple-of", type=positive_int, default=1, help="round down to a multiple")
    result.add_argument("--min-batch", type=positive_int, help="exit 3 when the micro-batch is below this")
    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object on stdout (people: stderr)")
    output.add_argument(
        "--format",
        default="text",
        choices=["text", *CONFIG_FORMATS],
        help="print the plan as the batch settings of Hugging Face, Lightning or DeepSpeed (JSON)",
    )
    output.add_argument("--no-progress", action="store_true", help="no progress spinner on stderr")

    d = sub.add_parser("demo", help="train a CNN on bundled digits on an emulated small device")
    d.add_argument("--epochs", type=positive_int, default=4)
    d.add_argument("--target-batch", type=positive_int, default=32)
    d.add_argument("--memory-limit", help="the emulated device's size (default: the demo's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the fit result as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from rich.console import Console

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    out, err = Console(), Console(stderr=True)
    as_json = bool(getattr(args, "json", False))
    command = {"probe": _cmd_probe, "demo": _cmd_demo}[args.command]
    try:
        return command(args, out, err)
    except (ValueError, TypeError) as exc:  # bad arguments and specs; the message names the culprit
        code, message = EXIT_USAGE, f"error: {exc}"
    except NoBatchFitsError as exc:
        code, message = EXIT_NO_FIT, f"no batch fits: {exc}"
    except Exception as exc:
        code, message = EXIT_ERROR, f"unexpected error: {type(exc).__name__}: {exc}"
        if args.verbose:
            err.print(traceback.format_exc(), markup=False, highlight=False)
        else:
            message += " (run with -v for the traceback)"
    err.print(message, style="red", markup=False, highlight=False)
    if as_json:
        _write_json({"schema_version": JSON_SCHEMA_VERSION, "ok": False, "exit_code": code, "error": message})
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
