"""What the probe, evaluation and fit return: data first, rendered as rich tables only at the edge.

Imports no torch: the command line reads cached results without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from autobatch.planner import Plan
from autobatch.probing.search import Trial
from autobatch.units import format_bytes

if TYPE_CHECKING:
    from autobatch.export import TrainerConfig

__all__ = ["Backoff", "EvalReport", "FitResult", "ProbeResult"]


def _bytes(n: float | None) -> str:
    return "–" if n is None else format_bytes(n)


@dataclass
class ProbeResult:
    """The outcome of :func:`autobatch.probe`.

    Attributes:
        micro_batch: the batch size to train with (``max_fitting_batch`` after margin and rounding).
        max_fitting_batch: the exact largest batch whose step fitted.
        first_failure: the smallest batch that ran out of memory (``None`` when capped first).
        capped_by: ``"max_batch"`` or ``"dataset"`` when the search stopped at a cap, else ``None``.
        device: the device probed.
        precision: the resolved precision (``"fp16"``, ``"bf16"`` or ``"fp32"``).
        memory_limit: the limit in bytes the steps ran under (``None``: the whole device).
        limit_kind: the limit and how it was enforced, for people.
        trials: every measured step (batch, fitted, peak bytes, seconds), in order.
        fixed_bytes: the fitted memory model's constant term (model state and workspace).
        bytes_per_sample: the fitted memory model's slope.
        model_state_bytes: what a training step holds whatever the batch: the sum of
            ``weights_bytes`` (parameters and buffers), ``gradients_bytes`` and ``optimizer_state_bytes``.
        optimizer_steps: optimizer steps the probe ran (one per trial, the warm-up included).
        ooms: trials that ran out of memory.
        margin: the fraction left free.
        multiple_of: the rounding applied.
        seconds: wall time of the probe.
        cached: whether the result came from the on-disk probe cache instead of a probe run.
        verified: a cached result that this call confirmed: its micro-batch survives training, and the
            memory model its verification recorded predicts no larger one (a cached micro-batch is never
            used untested).
        single_step_batch: the largest batch whose one step fits from steady state, packed: what a probe
            of single steps answers (``None`` where no memory model was made). Training can need less.
        fixed_point_steps: consecutive steps after which the allocator's state repeats at the answer (the
            most over a cold start and steady state; ``None``: none within the replay, memory changing
            from step to step).
        decided_by: the step of a training run that has the least room at the answer, e.g.
            ``"step 2 from a cold start"``.
        alloc_conf: the caching allocator's configuration the answer holds for (``PYTORCH_CUDA_ALLOC_CONF``:
            ``"default"``, ``"expandable_segments:True"``, ...); ``None`` where the limit caps live bytes.
        optimizer: the optimizer's class the probe measured (``"AdamW"``), for exported settings.
        expandable_batch: the largest micro-batch that would survive with
            ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` (``None`` when it is on already, or where
            the limit caps live bytes).
        predicted: the answer of :func:`autobatch.predict`: the steps ran on fake tensors (their trials
            too), nothing at full size; the probe cache never serves a predicted result.
        gpu: the card it was predicted for (``None``: a device of ``memory_limit``).
        budget_bytes: what the caching allocator may reserve, that the answer holds under: the card's
            memory less the CUDA context (or ``memory_limit``).
        kernels: the kernels the steps modelled: ``"cuda"`` with the card's compute capability, or
            ``"host"`` (this machine's, as ``probe`` on an emulated device runs them).
        prediction_notes: what the prediction assumed, modelled, left out or fell back to, one line each.
    """

    micro_batch: int
    max_fitting_batch: int
    first_failure: int | None
    capped_by: str | None
    device: str
    precision: str
    memory_limit: int | None
    limit_kind: str
    trials: list[Trial] = field(default_factory=list)
    fixed_bytes: float | None = None
    bytes_per_sample: float | None = None
    model_state_bytes: int | None = None
    weights_bytes: int | None = None
    gradients_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    optimizer_steps: int = 0
    ooms: int = 0
    margin: float = 0.0
    multiple_of: int = 1
    seconds: float = 0.0
    cached: bool = False
    verified: bool = False
    single_step_batch: int | None = None
    fixed_point_steps: int | None = None
    decided_by: str | None = None
    alloc_conf: str | None = None
    expandable_batch: int | None = None
    optimizer: str | None = None
    predicted: bool = False
    gpu: str | None = None
    budget_bytes: int | None = None
    kernels: str | None = None
    prediction_notes: list[str] = field(default_factory=list)

    def to_config(self, tool: str, target_batch: int, world_size: int = 1) -> TrainerConfig:
        """This micro-batch as the settings of another trainer (``"hf"``, ``"lightning"``, ``"deepspeed"``,
        ``"accelerate"``), with the precision and optimizer measured: see :mod:`autobatch.export`.

        Example:
            >>> probed = ProbeResult(11, 11, 12, None, "cpu", "bf16", None, "none", optimizer="AdamW")
            >>> probed.to_config("lightning", 32).settings
            {'batch_size': 8, 'accumulate_grad_batches': 4, 'precision': 'bf16-mixed'}
        """
        from autobatch.export import trainer_config

        return trainer_config(self, tool, target_batch=target_batch, world_size=world_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (trials as dicts)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProbeResult:
        """The result :meth:`to_dict` returned ``data`` for, every field checked (a cache file is input).

        Raises:
            TypeError: ``data`` is not a mapping, has unknown fields, or a field has the wrong type.
            KeyError: a required field is missing.
            ValueError: a field is out of range (``micro_batch`` above ``max_fitting_batch``, say).
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"Expected `data` to be a mapping, but got {type(data).__name__}.")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"Expected `data` to hold ProbeResult fields, but got unknown {sorted(unknown)}.")
        values = dict(data)
        for name in ("micro_batch", "max_fitting_batch"):
            values[name]  # a KeyError names a missing required field
        for name, kind in _RESULT_FIELDS.items():
            if name in values:
                _check_field(name, values[name], kind)
        if values["micro_batch"] > values["max_fitting_batch"]:
            raise ValueError(
                f"Expected `micro_batch` ≤ `max_fitting_batch`, but got {values['micro_batch']} > "
                f"{values['max_fitting_batch']}."
            )
        failure = values.get("first_failure")
        if failure is not None and failure <= values["max_fitting_batch"]:
            raise ValueError(f"Expected `first_failure` above `max_fitting_batch`, but got {failure}.")
        trials = values.get("trials", [])
        if not isinstance(trials, list) or not all(isinstance(t, Mapping) for t in trials):
            raise TypeError(f"Expected `trials` to be a list of objects, but got {type(trials).__name__}.")
        for trial in trials:
            for name, kind in _TRIAL_FIELDS.items():
                _check_field(f"trials[].{name}", trial.get(name) if name in trial else _MISSING, kind)
        values["trials"] = [Trial(**trial) for trial in trials]
        return cls(**values)

    def summary(self) -> str:
        """One line for logs: ``micro-batch 48 (largest fitting 48, 49 OOM) in 6 steps, 1 OOM``."""
        if self.capped_by is not None:
            why = f"capped by {self.capped_by}"
        else:
            why = f"{self.first_failure} does not fit"
        return (
            f"micro-batch {self.micro_batch} (largest fitting {self.max_fitting_batch}, {why}) on "
            f"{self.gpu or self.device} in {self.precision}, {self.optimizer_steps} steps, {self.ooms} OOM"
            + ("s" if self.ooms != 1 else "")
            + (self._cached_note() if self.cached else "")
            + (" (predicted)" if self.predicted else "")
        )

    def model_state(self) -> str:
        """``'1.20 MiB (weights 400 KiB, gradients 400 KiB, optimizer state 800 KiB)'``."""
        if self.model_state_bytes is None:
            return "–"
        parts = (self.weights_bytes, self.gradients_bytes, self.optimizer_state_bytes)
        if any(part is None for part in parts):
            return format_bytes(self.model_state_bytes)
        weights, gradients, state = (format_bytes(p) for p in parts if p is not None)
        return (
            f"{format_bytes(self.model_state_bytes)} (weights {weights}, gradients {gradients}, "
            f"optimizer state {state})"
        )

    def survival_notes(self) -> list[str]:
        """What the answer holds for over consecutive training steps, and what would buy more."""
        notes = []
        if self.decided_by is not None:
            fixed = (
                f"the allocator's state repeats after {self.fixed_point_steps} step"
                + ("s" if self.fixed_point_steps != 1 else "")
                if self.fixed_point_steps is not None
                else "memory changes from step to step (no fixed point)"
            )
            single = ""
            if self.single_step_batch is not None and self.single_step_batch != self.max_fitting_batch:
                single = f"; one step alone fits {self.single_step_batch}"
            notes.append(f"survives training: decided by {self.decided_by}; {fixed}{single}")
        if self.alloc_conf is not None:
            notes.append(f"allocator: {self.alloc_conf}")
        best = self.max_fitting_batch
        if self.expandable_batch is not None and self.expandable_batch > best:
            gain = (self.expandable_batch - best) / best
            notes.append(
                f"PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True would train at micro-batch "
                f"{self.expandable_batch} (+{gain:.0%})"
            )
        return notes

    def _cached_note(self) -> str:
        return " (from the probe cache, verified)" if self.verified else " (from the probe cache)"

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        title = f"autobatch {'predict' if self.predicted else 'probe'}: micro-batch {self.micro_batch}" + (
            self._cached_note() if self.cached else ""
        )
        if self.predicted:
            title += f" on {self.gpu or 'an emulated device'} (predicted)"
        table = Table()
        table.add_column("batch", justify="right")
        table.add_column("fits")
        table.add_column("peak", justify="right")
        table.add_column("seconds", justify="right")
        for trial in self.trials:
            label = f"{trial.batch} mixed" if trial.case == "mixed" else str(trial.batch)
            if trial.role != "verdict":  # a traced step that makes the memory model
                label += f" ({trial.role})"
            table.add_row(
                label,
                "[green]yes[/]" if trial.fitted else "[red]OOM[/]",
                _bytes(trial.peak_bytes),
                f"{trial.seconds:.3f}",
            )
        # Below the table, one fact per line: a caption would wrap them to the table's narrow width.
        lines = [
            self.summary(),
            f"limit {self.limit_kind} · model state {self.model_state()}",
        ]
        if any(trial.case == "mixed" for trial in self.trials):
            lines.append("mixed: the largest samples but one, with the smallest (a padded batch)")
        if any(trial.role != "verdict" for trial in self.trials):
            lines.append(
                "cold: a first step from a cold start, steady: a step at steady state (their memory "
                "timelines predict the answer); the others: the step that decides whether training survives"
                if not self.predicted
                else "cold: a first step from a cold start, steady: a step at steady state, on fake tensors "
                "(their memory timelines, replayed, give the answer)"
            )
        if self.bytes_per_sample is not None:
            lines.append(
                f"memory model: {_bytes(self.fixed_bytes)} + {_bytes(self.bytes_per_sample)} × batch"
            )
        lines.extend(self.survival_notes())
        if self.predicted:
            budget = _bytes(self.budget_bytes)
            lines.append(f"predicted with {self.kernels} kernels · the caching allocator's budget: {budget}")
            lines.extend(self.prediction_notes)
        if self.margin or self.multiple_of > 1:
            lines.append(f"margin {self.margin:.0%}, multiple of {self.multiple_of}")
        # The title too: as a table title it would wrap to the table's width.
        return Group(
            Text(title, style="bold"),
            table,
            *(Text(line, style="dim" if i else "bold") for i, line in enumerate(lines)),
        )


@dataclass
class EvalReport:
    """One evaluation: which one ran (``kind``) and its figures.

    Attributes:
        report: the figures as a dict: sklearn's ``classification_report`` (per class precision, recall,
            F1 and support, accuracy, averages) for a classification; ``loss``, ``perplexity``,
            ``token_accuracy`` and ``tokens`` for a language model.
        text: the same for people (sklearn's text report, or a few lines for a language model).
        accuracy: the share of correct predictions (of correctly predicted tokens for a language model:
            the next token for a causal LM).
        batch_size: the evaluation batch it ran with, after any back-off (the next evaluation starts from
            it): a given ``eval_batch``, or the largest the memory model said fits after a measured first
            batch, capped by the data.
        samples: the number of samples (sequences) scored.
        epoch: the training epoch after which it was taken (``None`` outside training).
        backoffs: the evaluation batch's out-of-memory back-offs (from, to).
        kind: ``"classification"``, ``"predict_fn"`` (a user's predictions, scored as a classification),
            ``"causal_lm"`` or ``"masked_lm"`` (see :mod:`autobatch.training.metrics`).
        loss: a language model's mean token loss (cross-entropy, nats); ``None`` for a classification.
        perplexity: ``exp(loss)``; ``None`` for a classification.
        tokens: the labelled tokens scored; ``None`` for a classification.
        nonfinite: outputs that were NaN or infinite: samples whose scored logits held one (a
            classification), or tokens whose loss was one (a language model; the loss is then NaN or
            infinite too). ``None`` where not counted: a ``predict_fn``'s predictions are its own.
    """

    report: dict[str, Any]
    text: str
    accuracy: float
    batch_size: int
    samples: int
    epoch: int | None = None
    backoffs: list[tuple[int, int]] = field(default_factory=list)
    kind: str = "classification"
    loss: float | None = None
    perplexity: float | None = None
    tokens: int | None = None
    nonfinite: int | None = None

    def headline(self) -> str:
        """``'accuracy 0.9722'``, or ``'perplexity 12.34 · next-token accuracy 0.4120 · loss 2.5127'``;
        with ``' · NaN/inf outputs in 3 samples'`` (or tokens) after it when there were any."""
        if self.perplexity is None:
            line = f"accuracy {self.accuracy:.4f}"
        else:
            what = "next-token accuracy" if self.kind == "causal_lm" else "token accuracy"
            line = f"perplexity {self.perplexity:.2f} · {what} {self.accuracy:.4f} · loss {self.loss:.4f}"
        if self.nonfinite:
            unit = "token" if self.tokens is not None else "sample"
            line += f" · NaN/inf outputs in {self.nonfinite:,} {unit}{'s' if self.nonfinite != 1 else ''}"
        return line

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "tokens": self.tokens,
            "nonfinite": self.nonfinite,
            "samples": self.samples,
            "batch_size": self.batch_size,
            "report": self.report,
        }


_MISSING = object()
_RESULT_FIELDS = {
    "micro_batch": "positive int",
    "max_fitting_batch": "positive int",
    "first_failure": "positive int or None",
    "capped_by": "capped_by",
    "device": "str",
    "precision": "precision",
    "memory_limit": "positive int or None",
    "limit_kind": "str",
    "fixed_bytes": "number or None",
    "bytes_per_sample": "number or None",
    "model_state_bytes": "count or None",
    "weights_bytes": "count or None",
    "gradients_bytes": "count or None",
    "optimizer_state_bytes": "count or None",
    "optimizer_steps": "count",
    "ooms": "count",
    "margin": "fraction",
    "multiple_of": "positive int",
    "seconds": "duration",
    "cached": "bool",
    "verified": "bool",
    "single_step_batch": "positive int or None",
    "fixed_point_steps": "positive int or None",
    "decided_by": "str or None",
    "alloc_conf": "str or None",
    "expandable_batch": "positive int or None",
    "optimizer": "str or None",
    "predicted": "bool",
    "gpu": "str or None",
    "budget_bytes": "positive int or None",
    "kernels": "str or None",
    "prediction_notes": "str list",
}
_TRIAL_FIELDS = {
    "batch": "positive int",
    "fitted": "bool",
    "peak_bytes": "count or None",
    "seconds": "duration",
    "backward_peak_bytes": "count or None",
    "reserved_bytes": "count or None",
    "case": "case",
    "role": "role or None",
}
_BOUND = 2**53
"""Counts and sizes above this are not a probe's (JSON numbers lose integer precision there)."""


def _check_field(name: str, value: Any, kind: str) -> None:
    """Raise TypeError/ValueError unless ``value`` is of ``kind`` (a field of a stored result)."""
    if value is _MISSING:
        if kind.endswith("or None"):
            return
        raise KeyError(name)
    if value is None and kind.endswith("or None"):
        return
    base = kind.removesuffix(" or None")
    if base in ("positive int", "count"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"Expected `{name}` to be an int, but got {type(value).__name__}.")
        if not (1 if base == "positive int" else 0) <= value < _BOUND:
            raise ValueError(f"Expected `{name}` to be a {base} below 2**53, but got {value}.")
    elif base in ("number", "duration", "fraction"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"Expected `{name}` to be a finite number, but got {value!r}.")
        if (base == "duration" and value < 0) or (base == "fraction" and not 0 <= value < 1):
            raise ValueError(f"Expected `{name}` to be a {base}, but got {value!r}.")
    elif base == "bool":
        if not isinstance(value, bool):
            raise TypeError(f"Expected `{name}` to be a bool, but got {type(value).__name__}.")
    elif base == "str":
        if not isinstance(value, str):
            raise TypeError(f"Expected `{name}` to be a str, but got {type(value).__name__}.")
    elif base == "str list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"Expected `{name}` to be a list of str, but got {value!r}.")
    elif base == "precision":
        if value not in ("fp16", "bf16", "fp32"):
            raise ValueError(f"Expected `{name}` to be 'fp16', 'bf16' or 'fp32', but got {value!r}.")
    elif base == "capped_by" and value not in (None, "max_batch", "dataset"):
        raise ValueError(f"Expected `{name}` to be 'max_batch', 'dataset' or None, but got {value!r}.")
    elif base == "case" and value not in ("longest", "mixed"):
        raise ValueError(f"Expected `{name}` to be 'longest' or 'mixed', but got {value!r}.")
    elif base == "role" and value not in ("verdict", "cold", "steady"):
        raise ValueError(f"Expected `{name}` to be 'verdict', 'cold' or 'steady', but got {value!r}.")


@dataclass(frozen=True)
class Backoff:
    """A change of the training micro-batch: an out-of-memory back-off, or a regrowth after clean steps."""

    epoch: int
    step: int
    from_micro: int
    to_micro: int


@dataclass
class FitResult:
    """The outcome of :func:`autobatch.fit`.

    Attributes:
        probe: the probe's result (``None`` when ``micro_batch`` was given).
        plan: the plan training started with.
        final_plan: the plan in force at the end (after back-offs and regrowths).
        losses: the loss of every optimizer step, averaged over its effective batch.
        skipped_steps: optimizer steps not applied: skipped by the GradScaler for inf/NaN gradients, or
            for a NaN/infinite loss (those are also counted in ``nonfinite_steps``).
        nonfinite_steps: optimizer steps whose loss (or clipped gradient norm) was NaN or infinite; they
            were skipped, and :class:`~autobatch.errors.NonFiniteLossError` stops training after
            several in a row.
        backoffs: out-of-memory back-offs during training (epoch, step, from, to).
        regrowths: micro-batch increases back towards the probed size after clean steps.
        evals: one evaluation report per epoch when ``eval_data`` was given.
        epochs: epochs trained.
        optimizer_steps: optimizer steps run (skipped ones included).
        samples: training samples processed (each once per epoch).
        train_seconds: wall time of the training epochs (probe and evaluation excluded).
        seconds: wall time of the whole call.
        cpu_threads: the CPU threads the probe and training ran on (``None`` off the CPU).
    """

    probe: ProbeResult | None
    plan: Plan
    final_plan: Plan
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    nonfinite_steps: int = 0
    backoffs: list[Backoff] = field(default_factory=list)
    regrowths: list[Backoff] = field(default_factory=list)
    evals: list[EvalReport] = field(default_factory=list)
    epochs: int = 0
    optimizer_steps: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    seconds: float = 0.0
    cpu_threads: int | None = None

    @property
    def samples_per_second(self) -> float:
        """Training throughput."""
        return self.samples / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def report(self) -> EvalReport | None:
        """The last evaluation report, if any."""
        return self.evals[-1] if self.evals else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "probe": self.probe.to_dict() if self.probe is not None else None,
            "plan": self.plan.to_dict(),
            "final_plan": self.final_plan.to_dict(),
            "losses": list(self.losses),
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "backoffs": [asdict(b) for b in self.backoffs],
            "regrowths": [asdict(b) for b in self.regrowths],
            "evals": [e.to_dict() for e in self.evals],
            "epochs": self.epochs,
            "optimizer_steps": self.optimizer_steps,
            "samples": self.samples,
            "train_seconds": self.train_seconds,
            "seconds": self.seconds,
            "samples_per_second": self.samples_per_second,
            "cpu_threads": self.cpu_threads,
        }

    def __rich__(self) -> Any:
        from rich.table import Table

        table = Table(title="autobatch fit", title_justify="left", show_header=False)
        table.add_column("what")
        table.add_column("value")
        table.add_row("plan", self.plan.describe())
        if self.final_plan != self.plan:
            table.add_row("final plan", self.final_plan.describe())
        table.add_row(
            "epochs / steps", f"{self.epochs} / {self.optimizer_steps} ({self.skipped_steps} skipped)"
        )
        if self.losses:
            table.add_row("loss", f"{self.losses[0]:.4f} → {self.losses[-1]:.4f}")
        table.add_row("OOM back-offs", str(len(self.backoffs)))
        threads = (
            f" on {self.cpu_threads} CPU thread{'s' if self.cpu_threads != 1 else ''}"
            if self.cpu_threads
            else ""
        )
        table.add_row("throughput", f"{self.samples_per_second:,.0f} samples/s{threads}")
        if self.report is not None:
            table.add_row("evaluation", f"{self.report.kind}: {self.report.headline()}")
        table.add_row("wall time", f"{self.seconds:.1f} s")
        return table
