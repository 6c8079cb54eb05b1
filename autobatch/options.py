"""Every option of every entry point, defined once.

An option is one field of a frozen dataclass, declared with :func:`option`: its default, its check, its help
text, its command-line flag (if it has one) and whether it changes the memory a training step takes (then
it is part of the probe cache's key). From these fields come, with no hand-kept copy anywhere:

* the keyword signatures of :func:`autobatch.fit`, :func:`autobatch.probe`, :func:`autobatch.try_batch` and
  :func:`autobatch.predict` (:func:`entry_point` writes them, and the options part of their docstrings);
* the checks, run once when the objects are built, before anything is touched;
* the command line's flags and their help (:mod:`autobatch.cli.parser`), the test kit's pass-through of
  options, the probe cache's key (:mod:`autobatch.cache.fingerprint`) and the README's options table
  (:func:`markdown_table`).

Adding an option is adding one field here; the code that uses its value is the only other change.

Imports no torch: the command line builds its parser from these fields before torch is loaded.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.threads import available_cores
from autobatch.units import parse_memory_limit
from autobatch.validate import (
    check_bool,
    check_callable,
    check_device,
    check_fraction,
    check_optional_bool,
    check_path,
    check_positive_int,
    check_positive_number,
    check_seed,
    optional,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "COLUMNS",
    "EMULATIONS",
    "ENTRY_POINTS",
    "PRECISIONS",
    "CacheOptions",
    "Cli",
    "EvalOptions",
    "MemoryOptions",
    "Options",
    "PredictOptions",
    "ProbeOptions",
    "StepOptions",
    "TrainOptions",
    "entry_fields",
    "entry_point",
    "markdown_table",
    "option",
]

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
EMULATIONS = ("auto", "ideal", "allocator")
EVAL_TASKS = ("auto", "classification", "causal_lm", "masked_lm")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Cli:
    """How an option appears on the command line: ``--flag`` and the argparse ``type``/``choices``."""

    flag: str
    type: str | None = None  # "positive_int" or "float": autobatch.cli.parser maps it to a converter
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    inverse: str | None = None  # a bool option whose flag turns it off, e.g. --no-cache


@dataclass(frozen=True)
class Spec:
    """What :func:`option` records about a field."""

    check: Callable[[Any, str], Any]
    help: str
    keyed: bool
    cli: Cli | None


def option(
    default: Any,
    check: Callable[[Any, str], Any],
    help: str,
    *,
    keyed: bool = True,
    cli: Cli | None = None,
) -> Any:
    """One option: a dataclass field with its check, help and flag.

    Args:
        default: the default value.
        check: ``check(value, name) -> value`` raises a usage error naming ``name``; may normalise.
        help: one line for the docstring, ``--help`` and the README table.
        keyed: whether the option changes the memory a training step takes, so that a probe result
            stored under one value must not answer for another (the probe cache's key holds it).
        cli: the command-line flag, or ``None`` for options that only the Python API takes.
    """
    return field(default=default, metadata={"spec": Spec(check, help, keyed, cli)})


def spec_of(f: Field[Any]) -> Spec:
    spec = f.metadata["spec"]
    assert isinstance(spec, Spec)
    return spec


@dataclass(frozen=True)
class _Group:
    """Base of the option groups: runs every field's check when the object is built."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = spec_of(f).check(getattr(self, f.name), f.name)
            object.__setattr__(self, f.name, value)

    def keyed(self) -> dict[str, Any]:
        """The values of the options that change a step's memory (for the probe cache's key)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if spec_of(f).keyed}


# -- checks that need more than the shared ones ------------------------------------------------------
def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check_choice(value: Any, name: str) -> str:
        if value not in choices:
            raise UsageValueError(
                f"Expected `{name}` to be one of {', '.join(map(repr, choices))}, but got {value!r}."
            )
        return str(value)

    return check_choice


def _check_memory_limit(value: Any, name: str) -> int | None:
    return parse_memory_limit(value, name=name)


def _check_gpu(value: Any, name: str) -> Any:
    """``None``, a card of :mod:`autobatch.memory.cards` by any name it knows (as the table names it), or a
    :class:`~autobatch.memory.cards.Card` of the user's."""
    from autobatch.memory.cards import Card, card  # imports no torch

    return value if value is None or isinstance(value, Card) else card(value).name


def _check_instance(kind: str, path: str) -> Callable[[Any, str], Any]:
    """``None`` or an instance of the torch class at ``path`` (imported when a value is checked)."""

    def check_instance(value: Any, name: str) -> Any:
        if value is None:
            return None
        module, _, attr = path.rpartition(".")
        cls = getattr(__import__(module, fromlist=[attr]), attr)
        if not isinstance(value, cls):
            raise UsageTypeError(f"Expected `{name}` to be {kind} or None, but got {type(value).__name__}.")
        return value

    return check_instance


def _check_scheduler(value: Any, name: str) -> Any:
    """``None``, an LR scheduler instance, or a factory ``optimizer -> scheduler``."""
    if value is None:
        return None
    fix = "Pass a scheduler of the optimizer, or a factory: scheduler=lambda opt: StepLR(opt, step_size=10)."
    if isinstance(value, type):
        raise UsageTypeError(f"Expected `{name}` to be a scheduler or a factory, but got the class "
                             f"{value.__name__}. {fix}")  # fmt: skip
    if type(value).__name__ == "ReduceLROnPlateau":
        raise UsageValueError(
            f"`{name}` is a ReduceLROnPlateau, which steps on a metric that fit does not have. Step it "
            "yourself after each epoch, or pass a scheduler that steps per optimizer step."
        )
    is_scheduler = callable(getattr(value, "step", None)) and hasattr(value, "optimizer")
    if not is_scheduler and (isinstance(value, (str, bytes, int, float)) or not callable(value)):
        raise UsageTypeError(
            f"Expected `{name}` to be a scheduler or a factory, but got {value!r} ({type(value).__name__}). "
            + fix
        )
    return value


def _check_target_names(value: Any, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not all(isinstance(n, str) for n in _iterable(value, name)):
        raise UsageTypeError(f"Expected `{name}` to be a sequence of str, but got {value!r}.")
    names = tuple(value)
    if not names:
        raise UsageValueError(f"Expected `{name}` to name at least one class, but got {value!r}.")
    return names


def _iterable(value: Any, name: str) -> Iterator[Any]:
    try:
        return iter(value)
    except TypeError:
        raise UsageTypeError(f"Expected `{name}` to be a sequence of str, but got {value!r}.") from None


def _any(value: Any, name: str) -> Any:
    return value  # checked by autobatch.step.data when the data is read


_callable = optional(check_callable)
_positive = optional(check_positive_int)


# -- the groups ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepOptions(_Group):
    """What one training step computes: the probe measures exactly this step, and training runs it."""

    optimizer: torch.optim.Optimizer | None = option(
        None,
        _check_instance("a torch.optim.Optimizer", "torch.optim.Optimizer"),
        "the optimizer training uses (default: AdamW, lr 1e-3, over the trainable parameters)",
    )
    loss_fn: Callable[[Any, Any], Any] | None = option(
        None, _callable, "loss_fn(outputs, targets) -> scalar loss (default: cross-entropy)"
    )
    step_fn: Callable[[Any, Any], Any] | None = option(
        None, _callable, "step_fn(model, batch) -> scalar loss, replacing the forward and the loss"
    )
    precision: str = option(
        "auto",
        _choice(PRECISIONS),
        "'auto' (fp16 + GradScaler on CUDA, bf16 where autocast supports it, else fp32), 'fp16', 'bf16' "
        "or 'fp32'",
        cli=Cli("--precision", choices=PRECISIONS),
    )
    grad_clip: float | None = option(
        None,
        optional(check_positive_number),
        "clip the global gradient norm to this value (after unscaling)",
        cli=Cli("--grad-clip", type="float", metavar="NORM"),
    )


def _check_threads(value: Any, name: str) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.isdigit():  # from the command line
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageValueError(f"Expected `{name}` to be 'auto' or a positive int, but got {value!r}.")
    cores = available_cores()
    if value > cores:  # more threads than cores only wait for each other; a thousand exhaust memory
        raise UsageValueError(
            f"Expected `{name}` to be 'auto' or at most the {cores} CPU core{'s' if cores != 1 else ''} "
            f"this process may use, but got {value}."
        )
    return value


@dataclass(frozen=True)
class MemoryOptions(_Group):
    """The device: where a step runs, and the memory it may use there."""

    memory_limit: int | str | None = option(
        None,
        _check_memory_limit,
        "bytes or e.g. '8GiB': caps the CUDA allocator; other devices emulate a device of that size",
        cli=Cli("--memory-limit", metavar="SIZE"),
    )
    device: torch.device | str | None = option(
        None,
        optional(check_device),
        "the device to run on (fit: default CUDA, then MPS, else CPU; probe: the model's)",
        cli=Cli("--device"),
    )
    emulation: str = option(
        "auto",
        _choice(EMULATIONS),
        "how an emulated device applies the limit: 'ideal' caps live tensor bytes, 'allocator' caps "
        "reserved memory as CUDA's caching allocator holds it; 'auto' is 'allocator' from 64 MiB up",
        cli=Cli("--emulation", choices=EMULATIONS),
    )
    cpu_threads: int | str = option(
        "auto",
        _check_threads,
        "threads for the probe and training on the CPU: 'auto' is 1 unless you set a number "
        "(OMP_NUM_THREADS, torch.set_num_threads); small CPU models train fastest on one",
        keyed=False,
        cli=Cli("--cpu-threads", metavar="N"),
    )


@dataclass(frozen=True)
class ProbeOptions(_Group):
    """How the probe builds its trials and what it returns."""

    size_fn: Callable[[Any], float] | None = option(
        None, _callable, "size_fn(sample) -> float ranks samples, so probe batches hold the largest"
    )
    max_batch: int | None = option(
        None, _positive, "never return more than this (tested before it is returned)",
        cli=Cli("--max-batch", type="positive_int", metavar="N"),
    )  # fmt: skip
    margin: float = option(
        0.0, check_fraction, "a fraction of the exact maximum to leave free (0.1 returns 90 %)",
        cli=Cli("--margin", type="float", metavar="FRACTION"),
    )  # fmt: skip
    multiple_of: int = option(
        1, check_positive_int, "round the micro-batch down to a multiple of this (8 suits tensor cores)",
        cli=Cli("--multiple-of", type="positive_int", metavar="N"),
    )  # fmt: skip
    accumulate: bool = option(
        True,
        check_bool,
        "also measure a micro-step that adds onto existing gradients (False when training will not "
        "accumulate)",
    )
    scaler: Any = option(
        None,
        _check_instance("a torch.amp.GradScaler", "torch.amp.GradScaler"),
        "a GradScaler whose state the probe must leave as it was (it steps with its own)",
        keyed=False,
    )
    on_trial: Callable[[Any], None] | None = option(
        None, _callable, "called with each Trial as it completes (progress displays)", keyed=False
    )


@dataclass(frozen=True)
class CacheOptions(_Group):
    """The on-disk probe cache."""

    cache: bool = option(
        True,
        check_bool,
        "reuse a probe result of the same setup from the on-disk cache (and store new ones)",
        keyed=False,
        cli=Cli("--no-cache", inverse="cache"),
    )
    cache_dir: Any = option(
        None,
        optional(check_path),
        "the cache directory (default: $AUTOBATCH_CACHE_DIR, else the user's cache directory, e.g. "
        "~/.cache/autobatch on Linux)",
        keyed=False,
        cli=Cli("--cache-dir", metavar="DIR"),
    )


@dataclass(frozen=True)
class TrainOptions(_Group):
    """The training loop of :func:`autobatch.fit`."""

    target_batch: int = option(
        32, check_positive_int, "the effective batch of every optimizer step, over all ranks",
        cli=Cli("--target-batch", type="positive_int", metavar="N"),
    )  # fmt: skip
    epochs: int = option(1, check_positive_int, "passes over the data; every sample is seen once per epoch")
    micro_batch: int | None = option(
        None, _positive, "skip the probe and train with this micro-batch (probe options are then refused)"
    )
    num_items: Callable[[Any], Any] | None = option(
        None, _callable, "num_items(batch) counts what a micro-loss averages over (e.g. non-padding tokens)"
    )
    scheduler: Any = option(
        None,
        _check_scheduler,
        "an LR scheduler of the optimizer, or a factory lambda opt: scheduler; stepped per applied step",
    )
    shuffle: bool | None = option(
        None, check_optional_bool, "shuffle each epoch (default: the DataLoader's sampler if any, else True)"
    )
    seed: int | None = option(
        None, optional(check_seed), "seeds torch, Python and NumPy and the epoch order, for reproducible runs"
    )
    drop_last: bool = option(False, check_bool, "drop a last step smaller than target_batch")
    regrow_after: int = option(
        50, check_positive_int, "clean steps after an out-of-memory back-off before the micro-batch grows"
    )
    progress: bool | None = option(None, check_optional_bool, "tqdm progress bars (None: only on a TTY)")


@dataclass(frozen=True)
class EvalOptions(_Group):
    """Evaluation after each epoch of :func:`autobatch.fit`."""

    eval_data: Any = option(None, _any, "data to evaluate after each epoch (same forms as data)")
    eval_batch: int | None = option(
        None,
        _positive,
        "the evaluation batch to start from (default: what the memory model says fits after one measured "
        "batch)",
    )
    predict_fn: Callable[[Any, Any], Any] | None = option(
        None, _callable, "predict_fn(model, batch) -> (predictions, labels) for evaluation"
    )
    target_names: tuple[str, ...] | None = option(
        None, _check_target_names, "class names for the classification report"
    )
    eval_task: str = option(
        "auto",
        _choice(EVAL_TASKS),
        "'classification' (sklearn's classification_report), 'causal_lm' (loss, perplexity and next-token "
        "accuracy, labels shifted), 'masked_lm' (the same, unshifted); 'auto' tells a Hugging Face "
        "language model by its class",
    )


@dataclass(frozen=True)
class PredictOptions(_Group):
    """The GPU :func:`autobatch.predict` answers for."""

    gpu: Any = option(
        None,
        _check_gpu,
        "the card to predict for, e.g. 'T4', 'A100-80GB', 'H100', or a Card (its memory less the CUDA "
        "context is the caching allocator's budget; CUDA's kernels are modelled)",
        keyed=False,
        cli=Cli("--gpu", metavar="NAME"),
    )


GROUPS: dict[str, type[_Group]] = {
    "step": StepOptions,
    "memory": MemoryOptions,
    "probe": ProbeOptions,
    "cache": CacheOptions,
    "train": TrainOptions,
    "eval": EvalOptions,
    "predict": PredictOptions,
}

ENTRY_POINTS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    # entry point: (the groups it takes, the options of those groups it does not take)
    "probe": (("step", "memory", "probe", "cache"), frozenset()),
    "try_batch": (("step", "memory", "probe"), frozenset({"max_batch", "margin", "multiple_of", "on_trial"})),
    # fit probes with accumulation measured and its own GradScaler
    "fit": (("step", "memory", "probe", "cache", "train", "eval"), frozenset({"accumulate", "scaler"})),
    # one optimizer step of the user's loop: the optimizer is an argument, the batch is the target
    "TrainStep": (
        ("step", "memory", "probe", "cache", "train"),
        frozenset(
            {
                "optimizer",
                "accumulate",
                "scaler",
                "target_batch",
                "epochs",
                "shuffle",
                "seed",
                "drop_last",
                "progress",
            }
        ),
    ),
    # autobatch.integrations.transformers.AutoBatchTrainer: the step is the Trainer's (its loss, optimizer,
    # precision and clipping come from its TrainingArguments), the target from them or `target_batch=`
    "AutoBatchTrainer": (
        ("memory", "probe", "cache", "train"),
        frozenset(
            {
                "device",
                "accumulate",
                "scaler",
                "target_batch",
                "epochs",
                "scheduler",
                "shuffle",
                "seed",
                "drop_last",
                "progress",
            }
        ),
    ),
    # autobatch.integrations.lightning.AutoBatch: probes, then Lightning's loop trains (its accumulation,
    # threads and scheduler); `target_batch` is the callback's own argument
    "AutoBatch": (
        ("memory", "probe", "cache", "train"),
        frozenset(
            {
                "device",
                "cpu_threads",
                "accumulate",
                "scaler",
                "target_batch",
                "epochs",
                "num_items",
                "scheduler",
                "shuffle",
                "seed",
                "drop_last",
                "regrow_after",
                "progress",
            }
        ),
    ),
    # a prediction: the card (or a limit) instead of a device; nothing of the user's is stepped or cached
    "predict": (("step", "memory", "probe", "predict"), frozenset({"device", "scaler", "on_trial"})),
}

COLUMNS = {
    "fit": "fit",
    "probe": "probe",
    "try_batch": "try_batch",
    "TrainStep": "TrainStep",
    "predict": "predict",
    "AutoBatchTrainer": "HF",
    "AutoBatch": "Lightning",
}
"""The options table's column for each entry point."""

PROBE_ONLY = frozenset(f.name for f in fields(ProbeOptions)) | {"cache", "cache_dir"}
"""Options that only matter when fit probes: refused together with ``micro_batch``."""


def entry_fields(entry: str) -> list[Field[Any]]:
    """The option fields ``entry`` takes, in signature order."""
    groups, excluded = ENTRY_POINTS[entry]
    return [f for g in groups for f in fields(GROUPS[g]) if f.name not in excluded]


@dataclass(frozen=True)
class Options:
    """Every option of one call, checked: one object per group (defaults where the entry takes none)."""

    entry: str
    step: StepOptions
    memory: MemoryOptions
    probe: ProbeOptions
    cache: CacheOptions
    train: TrainOptions
    eval: EvalOptions
    predict: PredictOptions
    given: frozenset[str]

    @classmethod
    def parse(cls, entry: str, kwargs: Mapping[str, Any]) -> Options:
        """Check ``kwargs`` as the options of ``entry`` (``"fit"``, ``"probe"``, ``"try_batch"``, ...).

        Raises:
            UsageTypeError: an unknown option (with the nearest known name), or a value of the wrong type.
            UsageValueError: a bad value, or options that contradict each other.
        """
        known = {f.name for f in entry_fields(entry)}
        unknown = [k for k in kwargs if k not in known]
        if unknown:
            name = unknown[0]
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" Did you mean `{near[0]}`?" if near else f" Known options: {', '.join(sorted(known))}."
            raise UsageTypeError(f"{entry}() got an unexpected keyword argument `{name}`.{hint}")
        groups = {
            g: cls_(**{f.name: kwargs[f.name] for f in fields(cls_) if f.name in kwargs})
            for g, cls_ in GROUPS.items()
        }
        options = cls(entry=entry, given=frozenset(kwargs), **groups)  # type: ignore[arg-type]
        options._check_together()
        return options

    def _check_together(self) -> None:
        if self.step.step_fn is not None and self.step.loss_fn is not None:
            raise UsageValueError(
                "Expected one of `step_fn` and `loss_fn`, but got both: step_fn replaces the forward and "
                "the loss, so loss_fn would never run. Compute the loss inside step_fn."
            )
        if self.entry != "probe" and self.train.micro_batch is not None:
            clash = sorted(self.given & PROBE_ONLY)
            if clash:
                raise UsageValueError(
                    f"Expected no probe options with `micro_batch={self.train.micro_batch}`, but got "
                    f"{', '.join(f'`{n}`' for n in clash)}: with micro_batch given, {self.entry} does not "
                    f"probe. Drop them, or drop micro_batch to let {self.entry} probe."
                )
        if self.eval.eval_data is None:
            clash = sorted(self.given & {"eval_batch", "predict_fn", "target_names", "eval_task"})
            if clash:
                raise UsageValueError(
                    f"Expected `eval_data` with {', '.join(f'`{n}`' for n in clash)}, but got no eval_data: "
                    "they only apply to evaluation."
                )
        if self.predict.gpu is not None and self.memory.emulation == "ideal":
            raise UsageValueError(
                f"Expected no `emulation='ideal'` with `gpu={self.predict.gpu!r}`: a GPU's memory is held by "
                "CUDA's caching allocator, which a prediction for a card always models. Drop emulation, or "
                "pass memory_limit= alone to predict for an ideal device."
            )
        if self.eval.predict_fn is not None and self.eval.eval_task != "auto":
            raise UsageValueError(
                f"Expected one of `predict_fn` and `eval_task={self.eval.eval_task!r}`, but got both: "
                "predict_fn's (predictions, labels) are scored by sklearn's classification_report."
            )
        if self.eval.target_names is not None and self.eval.eval_task.endswith("_lm"):
            raise UsageValueError(
                f"Expected no `target_names` with `eval_task={self.eval.eval_task!r}`: a language model's "
                "evaluation reports loss, perplexity and token accuracy, not classes."
            )


def entry_point(entry: str) -> Callable[[F], F]:
    """Give a public function the keyword signature and the options docs of ``entry``.

    The function itself takes ``**options``; its ``__signature__`` (what ``help()``, ``inspect`` and IDEs
    that read signatures show) lists every option with its default, and its docstring gets an
    ``Options`` section built from the help of each field.
    """

    def decorate(fn: F) -> F:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
        taken = {p.name for p in own}
        extra = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in entry_fields(entry)
            if f.name not in taken
        ]
        fn.__signature__ = inspect.signature(fn).replace(parameters=[*own, *extra])  # type: ignore[attr-defined]
        lines = [f"        {f.name}: {spec_of(f).help}." for f in entry_fields(entry) if f.name not in taken]
        fn.__doc__ = (
            (fn.__doc__ or "").rstrip() + "\n\n    Options (keyword only):\n" + "\n".join(lines) + "\n"
        )
        return fn

    return decorate


def default_of(name: str) -> Any:
    """The default of the option called ``name``."""
    for cls in GROUPS.values():
        for f in fields(cls):
            if f.name == name:
                return None if f.default is MISSING else f.default
    raise KeyError(name)


def markdown_table() -> str:
    """The README's options table: every option, its default, who takes it and what it does."""
    rows = [
        f"| option | default | {' | '.join(COLUMNS.values())} | CLI | what |",
        f"|---|---|{':-:|' * len(COLUMNS)}---|---|",
    ]
    taken = {entry: {f.name for f in entry_fields(entry)} for entry in ENTRY_POINTS}
    for cls in GROUPS.values():
        for f in fields(cls):
            spec = spec_of(f)
            marks = ["✓" if f.name in taken[e] else "" for e in COLUMNS]
            flag = f"`{spec.cli.flag}`" if spec.cli else ""
            what = spec.help.replace("|", "\\|")
            rows.append(f"| `{f.name}` | `{f.default!r}` | {' | '.join(marks)} | {flag} | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - `python -m autobatch.options` prints the README table
    print(markdown_table())
