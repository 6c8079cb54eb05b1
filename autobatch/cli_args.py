"""The arguments of ``autobatch``: its subcommands, their options, and the help's examples."""

from __future__ import annotations

import argparse

import autobatch
from autobatch.planner import CONFIG_FORMATS

__all__ = ["EXAMPLES", "build_parser", "positive_int"]

EXAMPLES = """\
examples:
  autobatch probe torchvision.models:resnet18 --input-shape 3,224,224 --num-classes 1000 \\
      --memory-limit 8GiB --target-batch 256
  autobatch probe models.py:build --data data.py:train_set --precision bf16 --json
  autobatch probe mypkg.lm:make_model --seq-len 512 --vocab 32000 --format hf --target-batch 64
  autobatch probe mypkg.nets:Net --input-shape 3,64,64 --min-batch 16 --json   # CI gate: exit 3 below 16
  autobatch demo
  autobatch cache show                                                  # cached probe results
exit codes: 0 ok · 1 unexpected error · 2 usage or spec error · 3 nothing fits or below --min-batch
"""


def positive_int(text: str) -> int:
    """An argparse type: an int ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, but got {text!r}")
    return value


def _cache_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, skip: bool = True) -> None:
    if skip:
        parser.add_argument(
            "--no-cache", action="store_true", help="always probe; neither read nor write the cache"
        )
    parser.add_argument("--cache-dir", help="probe cache directory (default: $AUTOBATCH_CACHE_DIR, ~/.cache)")


def _verbose_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a subcommand's default from overwriting `autobatch -v probe …`.
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as autobatch -v"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autobatch",
        description="Find the largest micro-batch that fits, and train at any target batch.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"autobatch {autobatch.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the probe's steps; tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{probe,demo,cache}")

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
    # Options left unset (None) yield to those a model factory's dict gives, then to the defaults.
    run.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], help="default: adamw")
    run.add_argument("--precision", choices=["auto", "fp16", "bf16", "fp32"], help="default: auto")
    run.add_argument("--memory-limit", help="e.g. 8GiB: caps the CUDA allocator; the CPU emulates a device")
    run.add_argument("--device", help="cuda, cuda:1, cpu … (default: CUDA when available)")
    result = p.add_argument_group("result")
    result.add_argument("--target-batch", type=positive_int, help="plan accumulation for this batch")
    result.add_argument("--world-size", type=positive_int, default=1, help="data-parallel ranks (1)")
    result.add_argument("--max-batch", type=positive_int, help="never report more than this")
    result.add_argument("--margin", type=float, help="fraction of the maximum to leave free (0)")
    result.add_argument("--multiple-of", type=positive_int, help="round down to a multiple of this (1)")
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
    _cache_options(output)
    _verbose_option(p)

    d = sub.add_parser("demo", help="train a CNN on bundled digits on an emulated small device")
    d.add_argument("--epochs", type=positive_int, default=4)
    d.add_argument("--target-batch", type=positive_int, default=32)
    d.add_argument("--memory-limit", help="the emulated device's size (default: the demo's)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", action="store_true", help="print the fit result as JSON")
    _cache_options(d)
    _verbose_option(d)

    c = sub.add_parser("cache", help="show or clear the cached probe results")
    c.add_argument("action", choices=["show", "clear"], help="list the cached results, or delete them all")
    c.add_argument("--json", action="store_true", help="one JSON object on stdout")
    _cache_options(c, skip=False)
    _verbose_option(c)
    return parser
