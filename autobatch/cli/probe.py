"""``autobatch probe MODEL``: the largest micro-batch of a model, for people (a table) or CI (``--json``)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from autobatch.cli.io import Streams, console
from autobatch.cli.parser import flag_fields, flag_size
from autobatch.errors import NoBatchFitsError, UsageError, UsageValueError
from autobatch.planner import Plan, plan

if TYPE_CHECKING:
    from autobatch.export import TrainerConfig

__all__ = ["check_format", "optimizer_for", "plans", "probe_payload", "report", "run"]


def optimizer_for(name: str, model: Any) -> Any:
    """The optimizer ``--optimizer NAME`` builds over the model's trainable parameters."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    return torch.optim.AdamW(params, lr=1e-3)


def plans(args: argparse.Namespace, result: Any) -> tuple[Plan | None, TrainerConfig | None]:
    """The plan for ``--target-batch`` and, with ``--format``, the tool's settings for it (with the
    precision and optimizer the probe measured)."""
    if args.target_batch is None:
        return None, None
    training = plan(result.micro_batch, args.target_batch, args.world_size)
    config = (
        result.to_config(args.format, args.target_batch, args.world_size) if args.format != "text" else None
    )
    return training, config


def check_format(args: argparse.Namespace) -> None:
    """``--format`` exports gradient accumulation for a target batch: without one it would be a silent 1."""
    if args.format != "text" and args.target_batch is None:
        raise UsageValueError(
            f"--format {args.format} needs --target-batch: the settings split a target batch into "
            "micro-batches and gradient accumulation steps. Pass the effective batch you train with, "
            f"e.g. --format {args.format} --target-batch 256."
        )


def _no_fit(exc: NoBatchFitsError, options: dict[str, Any], from_flags: bool) -> NoBatchFitsError:
    """The no-fit error worded for the command line: what to try as flags (``--memory-limit 2.19MiB``),
    built from the error's figures, where the Python message says ``memory_limit='2.19 MiB'``."""
    from autobatch.step.stepper import resolve_precision

    what, try_, _ = str(exc).rpartition(" Try ")
    hints = [
        f"--memory-limit {flag_size(exc.needed_bytes)} or more"
        if exc.needed_bytes is not None
        else "a larger --memory-limit"
    ]
    with contextlib.suppress(UsageError):  # a precision the device refuses was reported before the probe
        if resolve_precision(options.get("precision", "auto"), options["device"]) == "fp32":
            hints.append("--precision bf16 (or fp16 on CUDA)")
    hints.append("a smaller model")
    optimizer = type(options["optimizer"]).__name__
    if from_flags and optimizer != "SGD":
        hints.append(f"--optimizer sgd (less state than {optimizer})")
    elif not from_flags:
        hints.append("an optimizer with less state (SGD instead of Adam)")
    message = f"{what if try_ else str(exc)} Try {', '.join(hints)}."
    return NoBatchFitsError(
        message, memory_limit=exc.memory_limit, model_state=exc.model_state, needed_bytes=exc.needed_bytes
    )


def _progress(err: Any, enabled: bool) -> tuple[Any, Callable[[Any], None] | None]:
    """A spinner on stderr that names each trial as it completes (only on a terminal)."""
    if not enabled or not err.is_terminal:
        return None, None
    status = err.status("probing: warm-up step …")

    def on_trial(trial: Any) -> None:
        outcome = "fits" if trial.fitted else "[red]OOM[/]"
        status.update(f"probing: batch {trial.batch} {outcome} · next trial …")

    return status, on_trial


def _options(args: argparse.Namespace, factory: dict[str, Any], model: Any, device: Any) -> dict[str, Any]:
    """The probe's options: flags given on the command line, then the factory's dict, then defaults."""
    flags = {f.name: getattr(args, f.name) for f in flag_fields("probe") if getattr(args, f.name) is not None}
    options = {**factory, **flags, "device": device}
    if args.optimizer is not None or "optimizer" not in options:
        options["optimizer"] = optimizer_for(args.optimizer or "adamw", model)
    return options


def run(args: argparse.Namespace, streams: Streams) -> int:
    """Probe, render the result, and exit 3 when it is below ``--min-batch``."""
    check_format(args)  # before torch is imported: a usage error answers at once
    from autobatch.api import probe
    from autobatch.cli.inputs import build_inputs
    from autobatch.session import check_device_available, default_device
    from autobatch.validate import check_device

    if args.target_batch is not None:
        plan(1, args.target_batch, args.world_size)  # an indivisible target fails before the probe runs
    model, data, factory = build_inputs(args)
    device = (
        check_device_available(check_device(args.device, "device"), args.device)
        if args.device
        else default_device()
    )
    model.to(device)
    options = _options(args, factory, model, device)
    optimizer_from_flags = args.optimizer is not None or "optimizer" not in factory
    err = console(streams.stderr)
    status, on_trial = _progress(err, not args.no_progress)
    if status is not None:
        status.start()
    try:
        result = probe(model, data, on_trial=on_trial, **options)
    except NoBatchFitsError as exc:
        raise _no_fit(exc, options, optimizer_from_flags) from None
    finally:
        if status is not None:
            status.stop()
    return report(args, streams, result)


def report(args: argparse.Namespace, streams: Streams, result: Any) -> int:
    """Render ``result`` (the plan and settings too), write the ``--json`` object; 3 below ``--min-batch``."""
    training, config = plans(args, result)
    below = args.min_batch is not None and result.micro_batch < args.min_batch
    shortfall = f"micro-batch {result.micro_batch} is below --min-batch {args.min_batch}" if below else None
    err = console(streams.stderr)
    human = console(streams.people)
    human.print(result)
    if training is not None:
        human.print(f"[bold]plan[/]: {training.describe()}", highlight=False)
    if config is not None:
        human.print(f"[bold]{args.format} settings[/]: {json.dumps(config.settings)}", highlight=False)
        for note in config.notes:
            human.print(f"  {note}", style="dim", highlight=False)
    if shortfall:
        err.print(f"[red]{shortfall}[/]", highlight=False)
    if args.json:
        payload = probe_payload(result, training, config, args)
        payload.update(
            ok=not below,
            exit_code=3 if below else 0,
            error_kind="below --min-batch" if below else None,
            error=shortfall,
        )
        streams.write_json(payload)
    elif config is not None:  # the settings alone on stdout; their notes went to people's stream above
        streams.write_json(config.settings)
    return 3 if below else 0


def probe_payload(
    result: Any, training: Plan | None, config: TrainerConfig | None, args: Any
) -> dict[str, Any]:
    """The ``--json`` object of a probe that ran."""
    import torch

    from autobatch._version import __version__
    from autobatch.cli import JSON_SCHEMA_VERSION

    data = result.to_dict()
    fixed, per_sample = data.pop("fixed_bytes"), data.pop("bytes_per_sample")
    data["memory_model"] = (
        None if per_sample is None else {"fixed_bytes": fixed, "bytes_per_sample": per_sample}
    )
    return {
        "schema_version": JSON_SCHEMA_VERSION,
        "autobatch_version": __version__,
        "torch_version": torch.__version__,
        **data,
        "min_batch": args.min_batch,
        "plan": training.to_dict() if training is not None else None,
        "config": {args.format: config.settings} if config is not None else None,
        "config_notes": list(config.notes) if config is not None else None,
    }
