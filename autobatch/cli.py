"""The command line: ``autobatch probe MODULE:ATTR`` and ``autobatch demo`` (also ``python -m autobatch``).

A thin front over the public API: it builds the arguments, calls :func:`autobatch.probe` or
:func:`autobatch.fit`, and renders the returned data with rich, or prints it as JSON for CI.

Exit codes: 0 success; 1 the probed micro-batch is below ``--min-batch``; 2 bad usage or arguments;
3 not even a batch of one sample fits.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import autobatch
from autobatch.errors import NoBatchFitsError

__all__ = ["main"]

EXIT_BELOW_MIN, EXIT_USAGE, EXIT_NO_FIT = 1, 2, 3


def _load(spec: str, what: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"Expected {what} as MODULE:ATTR (e.g. mypkg.models:build), but got {spec!r}.")
    sys.path.insert(0, "")  # like `python -m`: modules in the working directory can be named
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:  # a usage error (exit 2), not a crash that exits 1 like --min-batch
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc}).") from exc
    finally:
        sys.path.pop(0)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def _model_and_data(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Resolve MODULE:ATTR into a model, its data and extra probe options."""
    target = _load(args.model, "model")
    extra: dict[str, Any] = {}
    if not isinstance(target, nn.Module) and callable(target):
        target = target()
    data = None
    if isinstance(target, dict):
        extra = {k: v for k, v in target.items() if k not in ("model", "data")}
        data = target.get("data")
        target = target.get("model")
    elif isinstance(target, tuple) and len(target) == 2:
        target, data = target
    if not isinstance(target, nn.Module):
        raise ValueError(
            f"Expected {args.model!r} to be an nn.Module, a callable returning one, or returning "
            f"(model, data) or a dict with 'model' and 'data'; got {type(target).__name__}."
        )
    if args.data is not None:
        data = _load(args.data, "data")
        if callable(data) and not hasattr(data, "__len__"):
            data = data()
    if data is None:
        if args.input_shape is None:
            raise ValueError(
                "No data: pass --data MODULE:ATTR, have the model factory return (model, data), or "
                "give --input-shape (and --classes) for random inputs."
            )
        shape = tuple(int(s) for s in args.input_shape.split(","))
        count = args.samples
        data = (torch.randn(count, *shape), torch.randint(0, args.classes, (count,)))
    return target, data, extra


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3)


def _cmd_probe(args: argparse.Namespace, console: Any) -> int:
    model, data, extra = _model_and_data(args)
    device = torch.device(args.device) if args.device else autobatch.validate.default_device()
    model.to(device)
    options: dict[str, Any] = {
        "precision": args.precision,
        "memory_limit": args.memory_limit,
        "device": device,
        "max_batch": args.max_batch,
        "margin": args.margin,
        "multiple_of": args.multiple_of,
        **extra,
    }
    if "optimizer" not in extra:
        options["optimizer"] = _optimizer(args.optimizer, model)
    result = autobatch.probe(model, data, **options)
    below = args.min_batch is not None and result.micro_batch < args.min_batch
    if args.json:
        print(json.dumps({**result.to_dict(), "ok": not below}, indent=2))
    else:
        console.print(result)
        if below:
            console.print(f"[red]micro-batch {result.micro_batch} is below --min-batch {args.min_batch}[/]")
    return EXIT_BELOW_MIN if below else 0


def _cmd_demo(args: argparse.Namespace, console: Any) -> int:
    from autobatch.demo import DEMO_MEMORY_LIMIT, DigitsCNN, load_digits_data

    digits = load_digits_data(seed=args.seed)
    torch.manual_seed(args.seed)
    model = DigitsCNN()
    if not args.json:
        console.print(
            f"[bold]autobatch demo[/]: a CNN on scikit-learn's digits ({len(digits.train[1])} train, "
            f"{len(digits.test[1])} held out), target batch {args.target_batch}, emulated device of "
            f"{args.memory_limit or DEMO_MEMORY_LIMIT}"
        )
    result = autobatch.fit(
        model,
        digits.train,
        target_batch=args.target_batch,
        epochs=args.epochs,
        eval_data=digits.test,
        target_names=digits.target_names,
        memory_limit=args.memory_limit or DEMO_MEMORY_LIMIT,
        device="cpu",
        seed=args.seed,
        progress=False if args.json else None,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if result.probe is not None:
        console.print(result.probe)
    console.print(f"[bold]plan[/]: {result.plan.describe()}")
    console.print(result)
    if result.report is not None:
        console.print(f"[bold]held-out classification report[/] (epoch {result.epochs})")
        console.print(result.report.text, markup=False, highlight=False)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobatch",
        description="Find the largest micro-batch that fits, and train at any target batch.",
    )
    parser.add_argument("--version", action="version", version=f"autobatch {autobatch.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the probe's steps")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("probe", help="probe the largest micro-batch of a model")
    p.add_argument(
        "model",
        help="MODULE:ATTR of an nn.Module, or of a callable returning a module, (model, data), or a "
        "dict with 'model', 'data' and probe options",
    )
    p.add_argument("--data", help="MODULE:ATTR of a Dataset, DataLoader, tensors (X, y) or a callable")
    p.add_argument("--input-shape", help="random inputs of this per-sample shape, e.g. 3,224,224")
    p.add_argument("--classes", type=int, default=10, help="classes of the random labels (10)")
    p.add_argument("--samples", type=int, default=4096, help="random samples to make (4096)")
    p.add_argument("--memory-limit", help="e.g. 8GiB; CUDA caps its allocator, the CPU emulates a device")
    p.add_argument("--precision", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--device", help="cuda, cuda:1, cpu … (default: CUDA if available)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adam", "sgd"])
    p.add_argument("--max-batch", type=int, help="never report more than this")
    p.add_argument("--margin", type=float, default=0.0, help="fraction of the maximum to leave free")
    p.add_argument("--multiple-of", type=int, default=1, help="round down to a multiple of this")
    p.add_argument("--min-batch", type=int, help="exit 1 when the micro-batch is below this (CI)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    d = sub.add_parser("demo", help="train a CNN on bundled digits on an emulated small device")
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--target-batch", type=int, default=32)
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
    console = Console(stderr=bool(getattr(args, "json", False)))
    try:
        if args.command == "probe":
            return _cmd_probe(args, console)
        return _cmd_demo(args, console)
    except (ValueError, TypeError) as exc:
        console.print(f"[red]error:[/] {exc}", markup=True, highlight=False)
        return EXIT_USAGE
    except NoBatchFitsError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(exc)}))
        console.print(f"[red]no batch fits:[/] {exc}", highlight=False)
        return EXIT_NO_FIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
