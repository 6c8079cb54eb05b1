"""The arguments of ``autobatch``: its subcommands, their flags and the help's examples.

The flags of the training step and the probe come from the option fields (:mod:`autobatch.options`): a
field with a ``Cli`` is a flag here, with the field's help and default, and reaches
:func:`autobatch.probe` under the field's name. Importing this module imports no torch: ``--help`` and
``--version`` answer at once.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import Field
from typing import Any, NoReturn

from autobatch._version import __version__
from autobatch.errors import UsageValueError
from autobatch.options import ENTRY_POINTS, GROUPS, entry_fields, spec_of
from autobatch.planner import CONFIG_FORMATS
from autobatch.units import format_bytes

__all__ = [
    "EXAMPLES",
    "ArgumentParser",
    "build_parser",
    "flag_fields",
    "flag_size",
    "positive_int",
]

EXAMPLES = """\
examples:
  autobatch probe autobatch.demo:DigitsCNN --input-shape 1,8,8 --memory-limit 640KiB --target-batch 32
  autobatch probe autobatch.demo:DigitsCNN --input-shape 1,8,8 --memory-limit 640KiB \\
      --min-batch 8 --no-cache --json                     # a CI gate: exit 3 below micro-batch 8
  autobatch probe models.py:build --data data.py:train_set --precision bf16 --json
  autobatch probe mypkg.lm:make_model --seq-len 512 --vocab 32000 --format hf --target-batch 64
  autobatch probe torchvision.models:resnet18 --input-shape 3,224,224 --num-classes 1000 \\
      --memory-limit 8GiB --target-batch 256              # needs torchvision
  autobatch predict mypkg.lm:make_model --seq-len 512 --vocab 32000 --gpu A100-80GB \\
      --min-batch 16 --json                               # for a card this machine does not have
  autobatch demo
  autobatch cache show                                  # cached probe results
exit codes: 0 ok · 1 unexpected error · 2 usage or spec error · 3 nothing fits or below --min-batch ·
  130 interrupted (Ctrl-C) · 143 terminated (SIGTERM); with --json, each with its one JSON object
"""
"""The help's examples; the first runs on a plain install (a test runs it)."""

_DEMO_MEMORY_LIMIT = 640 * 1024
"""``autobatch demo``'s emulated device: :data:`autobatch.demo.DEMO_MEMORY_LIMIT`, which imports torch."""

_CLI_HELP = {
    "device": "the device to run on, e.g. cuda, cuda:1, mps or cpu (default: CUDA when available, then MPS, "
    "else the CPU; the model is moved there)",
}
"""Help of option fields whose command-line behaviour differs from the Python API's: ``autobatch probe``
picks a device where :func:`autobatch.probe` uses the model's."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises a usage error instead of printing and exiting, so ``--json`` can report it.

    Abbreviated flags are refused (``--jso`` is no ``--json``): a CI gate's flags mean what they say.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageValueError(f"{self.prog}: {message}")


def positive_int(text: str) -> int:
    """An argparse type: an int ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, but got {text!r}")
    return value


_TYPES: dict[str, Callable[[str], Any]] = {"positive_int": positive_int, "float": float}


def flag_fields(entry: str = "probe") -> list[Field[Any]]:
    """The option fields of ``entry`` that are command-line flags."""
    return [f for f in entry_fields(entry) if spec_of(f).cli is not None]


def flag_size(n: float) -> str:
    """A byte count as a ``--memory-limit`` value that holds it: :func:`~autobatch.units.format_bytes`
    rounded up, without its space (one shell word): ``'2.19MiB'``."""
    return format_bytes(n, up=True).replace(" ", "")


def _default_text(f: Field[Any]) -> str:
    if f.name == "cache_dir":  # its help names the rule; here is where that rule points now
        from autobatch.cache.store import default_cache_dir

        return f"; here {default_cache_dir()}"
    return "" if f.default is None else f" (default: {f.default})"


def _add_option(group: Any, f: Field[Any]) -> None:
    """The flag of one option field; left unset it is ``None`` (it yields to a factory's dict, then to the
    option's default)."""
    cli = spec_of(f).cli
    assert cli is not None
    if cli.inverse is not None:  # a bool option whose flag turns it off
        group.add_argument(
            cli.flag, dest=f.name, action="store_false", default=None, help=f"do not {spec_of(f).help}"
        )
        return
    text = _CLI_HELP.get(f.name, spec_of(f).help + _default_text(f)).replace(
        "%", "%%"
    )  # argparse formats help with %
    kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": text}
    if cli.choices is not None:
        kwargs["choices"] = cli.choices
    if cli.type is not None:
        kwargs["type"] = _TYPES[cli.type]
    if cli.metavar is not None:
        kwargs["metavar"] = cli.metavar
    group.add_argument(cli.flag, **kwargs)


def _verbose_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a subcommand's default from overwriting `autobatch -v probe …`.
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log autobatch's steps; tracebacks of unexpected errors",
    )


_MEASURES = {
    "probe": (
        "probe the largest micro-batch of a model",
        "Run the real training step at growing batch sizes and report the largest that fits.",
    ),
    "predict": (
        "predict the largest micro-batch of a model on a GPU this machine does not have",
        "Trace two small training steps on fake tensors (nothing at full size is allocated), under the "
        "card's CUDA kernels, and replay training through a model of its caching allocator: the largest "
        "micro-batch that survives on --gpu NAME (or an emulated device of --memory-limit SIZE).",
    ),
}


def _measure_parser(sub: Any, command: str) -> None:
    """``probe`` and ``predict``: the same model, data, step and result flags; each its device flags."""
    help_text, description = _MEASURES[command]
    p = sub.add_parser(
        command,
        help=help_text,
        description=description,
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
        "--num-classes", "--classes", type=positive_int, help="classes of the random labels (default: 10)"
    )
    inputs.add_argument("--samples", type=positive_int, default=4096, help="random samples (default: 4096)")
    groups = {
        "step": p.add_argument_group("training step"),
        "memory": p.add_argument_group("device"),
        "probe": p.add_argument_group("result"),
    }
    if "cache" in ENTRY_POINTS[command][0]:
        groups["cache"] = p.add_argument_group("probe cache")
    groups["predict"] = groups["memory"]  # --gpu is the device a prediction is for
    groups["step"].add_argument("--optimizer", choices=["adamw", "adam", "sgd"], help="(default: adamw)")
    for f in flag_fields(command):
        group = next(g for g, cls in GROUPS.items() if f.name in cls.__dataclass_fields__)
        _add_option(groups[group], f)
    target = next(f for f in entry_fields("fit") if f.name == "target_batch")
    result = groups["probe"]
    result.add_argument(
        spec_of(target).cli.flag,  # type: ignore[union-attr]
        dest="target_batch",
        type=positive_int,
        help="plan accumulation for this effective batch",
    )
    result.add_argument("--world-size", type=positive_int, default=1, help="data-parallel ranks (default: 1)")
    result.add_argument("--min-batch", type=positive_int, help="exit 3 when the micro-batch is below this")
    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="one JSON object on stdout (people: stderr)")
    output.add_argument(
        "--format",
        default="text",
        choices=["text", *CONFIG_FORMATS],
        help="print the plan for --target-batch as the batch settings of Hugging Face, Lightning or "
        "DeepSpeed (JSON)",
    )
    output.add_argument("--no-progress", action="store_true", help="no progress spinner on stderr")
    _verbose_option(p)


def _demo_parser(sub: Any) -> None:
    d = sub.add_parser(
        "demo",
        help="train a CNN on bundled digits on an emulated small device",
        description="Probe, plan, train and evaluate a small CNN on scikit-learn's digits (no download), on "
        "an emulated device too small for the target batch, so that gradient accumulation kicks in.",
    )
    d.add_argument(
        "--epochs", type=positive_int, default=4, help="passes over the training split (default: 4)"
    )
    d.add_argument("--target-batch", type=positive_int, default=32, help="the effective batch (default: 32)")
    d.add_argument(
        "--memory-limit",
        default=format_bytes(_DEMO_MEMORY_LIMIT),
        help=f"the emulated device's size (default: {format_bytes(_DEMO_MEMORY_LIMIT)})",
    )
    d.add_argument(
        "--seed", type=int, default=0, help="seeds the split, the model and the epoch order (default: 0)"
    )
    d.add_argument("--json", action="store_true", help="print the fit result as one JSON object on stdout")
    for f in entry_fields("fit"):
        if f.name in ("cache", "cache_dir"):
            _add_option(d, f)
    _verbose_option(d)


def _cache_parser(sub: Any) -> None:
    c = sub.add_parser("cache", help="show or clear the cached probe results")
    c.add_argument("action", choices=["show", "clear"], help="list the cached results, or delete them all")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _add_option(c, next(f for f in entry_fields("probe") if f.name == "cache_dir"))
    _verbose_option(c)


def build_parser() -> ArgumentParser:
    """The ``autobatch`` parser: ``probe``, ``predict``, ``demo`` and ``cache``."""
    parser = ArgumentParser(
        prog="autobatch",
        description="Find the largest micro-batch that fits, and train at any target batch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autobatch {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log autobatch's steps; tracebacks of unexpected errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{probe,predict,demo,cache}")
    _measure_parser(sub, "probe")
    _measure_parser(sub, "predict")
    _demo_parser(sub)
    _cache_parser(sub)
    return parser


def wants_json(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was asked for, read before parsing (a usage error is then reported as JSON)."""
    return "--json" in argv
