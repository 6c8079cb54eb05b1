"""Check everything, then act: a refused call leaves the model, its device and the generators as they were.

:func:`autobatch.session.resolve` runs every check of :func:`autobatch.fit`, :func:`autobatch.probe` and
:func:`autobatch.try_batch` before anything is touched; :meth:`~autobatch.session.Session.start` undoes
what it did when the call fails before training begins. Each refusal below is checked for its error, its
message (which names the argument) and for what it left behind: weights and buffers bit for bit, devices,
pending gradients, train/eval flags, no ``model._apply`` (no move), and the torch, Python and NumPy
generators.
"""

from __future__ import annotations

import inspect
import pydoc
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR
from torch.utils.data import Dataset

import autobatch
from autobatch import UsageTypeError, UsageValueError
from autobatch.options import entry_fields

FEATURES, CLASSES, SAMPLES, TARGET = 8, 3, 64, 32
LIMIT = "256KiB"
NAMES = ["a", "b", "c"]


# -- models and data --------------------------------------------------------------------------------


def mlp() -> nn.Module:
    """A small MLP with a BatchNorm layer, so that it has buffers to keep on their device."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def tensors(n: int = SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Every class appears, so that the largest label of the evaluation data is CLASSES - 1.
    return torch.randn(n, FEATURES, generator=g), torch.arange(n) % CLASSES


class Pairs(Dataset[tuple[torch.Tensor, int]]):
    """A Dataset of ``(x, y)`` pairs (no ``targets``: its labels are read sample by sample)."""

    def __init__(self, n: int = SAMPLES) -> None:
        self.X, self.y = tensors(n, seed=1)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return self.X[i], int(self.y[i])


class WithTargets(Pairs):
    """Pairs with a ``targets`` list, as torchvision datasets have."""

    def __init__(self, n: int = SAMPLES) -> None:
        super().__init__(n)
        self.targets = self.y.tolist()


class Augmenting(Pairs):
    """Draws from torch's and Python's global generators on every read, as random augmentation does."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, label = super().__getitem__(i)
        return x + 0.01 * torch.rand(FEATURES) * random.random(), label


class Unlabelled(Augmenting):
    def __getitem__(self, i: int) -> Any:
        return super().__getitem__(i)[0]


class Named(Augmenting):
    """Augmenting pairs whose labels are class names: strings, which no classification report scores."""

    def __getitem__(self, i: int) -> Any:
        x, label = super().__getitem__(i)
        return x, NAMES[label]


class Records(Pairs):
    """Dict samples with a `label` (singular) key, as a Hugging Face dataset has before its collator."""

    def __getitem__(self, i: int) -> Any:
        x, label = super().__getitem__(i)
        return {"x": x, "label": label}


def regression(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    return tensors(n)[0], torch.randn(n, generator=torch.Generator().manual_seed(3))


def multi_hot(n: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    return tensors(n)[0], (torch.arange(n * CLASSES).reshape(n, CLASSES) % 2).float()


# -- what a call may not change ---------------------------------------------------------------------


def numpy_state_equal(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y for x, y in zip(a, b, strict=True)
    )


@dataclass
class Generators:
    """The global generators' states, taken when built."""

    torch_state: torch.Tensor = field(default_factory=torch.get_rng_state)
    python_state: Any = field(default_factory=random.getstate)
    numpy_state: Any = field(default_factory=np.random.get_state)

    def assert_unchanged(self) -> None:
        assert torch.equal(torch.get_rng_state(), self.torch_state), "torch's generator changed"
        assert random.getstate() == self.python_state, "Python's generator changed"
        assert numpy_state_equal(np.random.get_state(), self.numpy_state), "NumPy's generator changed"


@dataclass
class Untouched:
    """A model's weights, buffers, devices, pending gradients and modes, and the generators, as they were."""

    model: nn.Module
    state: dict[str, torch.Tensor] = field(init=False)
    devices: dict[str, torch.device] = field(init=False)
    grads: dict[str, torch.Tensor | None] = field(init=False)
    modes: list[bool] = field(init=False)
    generators: Generators = field(init=False)
    moves: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        model = self.model
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        named = [*model.named_parameters(), *model.named_buffers()]
        self.devices = {name: t.device for name, t in named}
        self.grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        self.modes = [m.training for m in model.modules()]
        real_apply = model._apply

        def spy(fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.moves.append(fn)
            return real_apply(fn, *args, **kwargs)

        model._apply = spy  # type: ignore[method-assign]
        self.generators = Generators()

    def assert_unchanged(self, *, moved: bool = False, modes: bool = True) -> None:
        """Everything as it was; ``moved``: the call may have called ``model.to`` (then undone it)."""
        model = self.model
        if not moved:
            assert not self.moves, "the model was moved before the arguments were checked"
        after = model.state_dict()
        assert after.keys() == self.state.keys()
        changed = [k for k, v in after.items() if not torch.equal(v, self.state[k])]
        assert not changed, f"changed: {changed}"
        named = [*model.named_parameters(), *model.named_buffers()]
        assert {name: t.device for name, t in named} == self.devices
        for name, p in model.named_parameters():
            before = self.grads[name]
            if before is None:
                assert p.grad is None, f"{name} got a gradient"
            else:
                assert p.grad is not None and torch.equal(p.grad, before), f"{name}'s gradient changed"
        if modes:
            assert [m.training for m in model.modules()] == self.modes, "train/eval flags changed"
        self.generators.assert_unchanged()


# -- the calls --------------------------------------------------------------------------------------


@dataclass
class Setup:
    """What a refused call works on: the model, its SGD optimizer and the training tensors."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data: tuple[torch.Tensor, torch.Tensor]
    forwards: list[int] = field(default_factory=list)
    made: Any = None  # what the case's ``before`` built, before the snapshot

    def loss_spy(self, outputs: Any, targets: Any) -> torch.Tensor:
        self.forwards.append(1)
        return nn.functional.cross_entropy(outputs, targets)


def fit_mb(s: Setup, **options: Any) -> Any:
    """``fit`` with a given micro-batch: no probe."""
    options = {"micro_batch": 8, "device": "cpu", "precision": "fp32", "progress": False, **options}
    return autobatch.fit(s.model, options.pop("data", s.data), TARGET, **options)


def fit_probing(s: Setup, **options: Any) -> Any:
    """``fit`` that would probe, under a small emulated memory."""
    options = {"device": "cpu", "memory_limit": LIMIT, "precision": "fp32", "progress": False, **options}
    return autobatch.fit(s.model, options.pop("data", s.data), TARGET, **options)


def probe(s: Setup, **options: Any) -> Any:
    return autobatch.probe(s.model, s.data, precision="fp32", memory_limit=LIMIT, **options)


def try_batch(s: Setup, batch_size: int, **options: Any) -> Any:
    return autobatch.try_batch(s.model, s.data, batch_size, precision="fp32", memory_limit=LIMIT, **options)


def other_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


def plateau_after_lambda(opt: torch.optim.Optimizer) -> Any:
    """A factory that changes the optimizer's lr (and adds initial_lr), then returns a ReduceLROnPlateau."""
    LambdaLR(opt, lambda epoch: 0.5)
    return ReduceLROnPlateau(opt)


def not_a_scheduler(opt: torch.optim.Optimizer) -> Any:
    """A factory that makes a scheduler (changing the optimizer's lr), then returns something else."""
    LambdaLR(opt, lambda epoch: 0.25)
    return 42


HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@dataclass(frozen=True)
class Refusal:
    """A call that must be refused: ``call(setup)``, the error, and a pattern of its message.

    ``before(setup)`` builds what the call passes (a scheduler) before the state is taken, as a user
    would; ``starts``: refused by :meth:`Session.start` (a scheduler factory runs there, after
    ``model.to``), so the model may have been moved; it must be back.
    """

    id: str
    call: Callable[[Setup], Any]
    error: type[Exception]
    match: str
    starts: bool = False
    before: Callable[[Setup], Any] | None = None
    marks: tuple[Any, ...] = ()


SHORT = {"target_names": NAMES[:2]}
EVAL_LABELS = r"`eval_data` labels to be integer class indices .*classification evaluation.*but got "
EVAL_FIXES = r"`predict_fn=lambda model, batch: \(predictions, labels\)`.*`eval_task=.*leave out `eval_data`"
TARGET_NAMES_SHORT = r"`target_names`.*every class 0\.\.2 of `eval_data`.*2 names"
ARRAYS = r"`{name}` as tensors \(X, y\).*a {kind} of \({types}\).*torch\.as_tensor"
NOT_AVAILABLE = r"`device` is '{name}' but (no {name} device is available|CUDA is not available) here"

REFUSALS = [
    # devices
    Refusal(
        "margin=1.5 device=meta",
        lambda s: fit_probing(s, margin=1.5, device="meta"),
        UsageValueError,
        r"`margin`.*\[0, 1\).*1\.5",
    ),
    Refusal("device=meta", lambda s: fit_mb(s, device="meta"), UsageValueError, r"`device`.*'meta'"),
    Refusal(
        "device=meta probing", lambda s: fit_probing(s, device="meta"), UsageValueError, r"`device`.*meta"
    ),
    Refusal(
        "device=mps",
        lambda s: fit_mb(s, device="mps"),
        UsageValueError,
        NOT_AVAILABLE.format(name="mps"),
        marks=(pytest.mark.skipif(HAS_MPS, reason="this machine has MPS"),),
    ),
    Refusal(
        "device=cuda",
        lambda s: fit_mb(s, device="cuda"),
        UsageValueError,
        NOT_AVAILABLE.format(name="cuda"),
        marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),),
    ),
    Refusal(
        "probe device=cuda",
        lambda s: probe(s, device="cuda"),
        UsageValueError,
        NOT_AVAILABLE.format(name="cuda"),
        marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),),
    ),
    # probe options with micro_batch
    *(
        Refusal(
            f"micro_batch+{name}",
            lambda s, kw=kw: fit_mb(s, **kw),
            UsageValueError,
            rf"no probe options with `micro_batch=8`.*`{name}`",
        )
        for name, kw in {
            "margin": {"margin": 0.1},
            "multiple_of": {"multiple_of": 8},
            "cache": {"cache": False},
            "cache_dir": {"cache_dir": "/nonexistent/autobatch-cache"},
            "max_batch": {"max_batch": 16},
            "size_fn": {"size_fn": lambda sample: 1.0},
        }.items()
    ),
    # grad_clip
    Refusal(
        "grad_clip str", lambda s: fit_mb(s, grad_clip="1.0"), UsageTypeError, r"`grad_clip`.*'1\.0' \(str\)"
    ),
    Refusal("grad_clip<0", lambda s: fit_mb(s, grad_clip=-1), UsageValueError, r"`grad_clip`.*positive.*-1"),
    Refusal(
        "grad_clip inf",
        lambda s: fit_mb(s, grad_clip=float("inf")),
        UsageValueError,
        r"`grad_clip`.*finite.*inf",
    ),
    Refusal("probe grad_clip str", lambda s: probe(s, grad_clip="1.0"), UsageTypeError, r"`grad_clip`.*str"),
    # schedulers
    Refusal(
        "scheduler str",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler="steplr"),
        UsageTypeError,
        r"`scheduler`.*'steplr' \(str\).*factory",
    ),
    Refusal(
        "scheduler int",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler=10),
        UsageTypeError,
        r"`scheduler`.*10 \(int\)",
    ),
    Refusal(
        "scheduler class",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler=StepLR),
        UsageTypeError,
        r"`scheduler`.*the class StepLR.*lambda opt",
    ),
    Refusal(
        "scheduler ReduceLROnPlateau",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler=s.made),
        UsageValueError,
        r"`scheduler` is a ReduceLROnPlateau",
        before=lambda s: ReduceLROnPlateau(s.optimizer),
    ),
    Refusal(
        "scheduler of another optimizer",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler=s.made),
        UsageValueError,
        r"`scheduler`.*bound to another optimizer",
        before=lambda s: StepLR(other_optimizer(), step_size=1),
    ),
    Refusal(
        "scheduler without optimizer",
        lambda s: fit_mb(s, scheduler=s.made),
        UsageValueError,
        r"`scheduler`.*another optimizer.*builds its own AdamW",
        before=lambda s: StepLR(s.optimizer, step_size=1),
    ),
    Refusal(
        "factory makes ReduceLROnPlateau",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler=plateau_after_lambda, seed=7),
        UsageValueError,
        r"`scheduler` made a ReduceLROnPlateau",
        starts=True,
    ),
    Refusal(
        "factory makes no scheduler",
        lambda s: fit_mb(s, optimizer=s.optimizer, scheduler=not_a_scheduler),
        UsageTypeError,
        r"`scheduler`.*factory returned int",
        starts=True,
    ),
    Refusal(
        "factory without optimizer",
        lambda s: fit_mb(s, scheduler=lambda opt: "cosine", seed=1),
        UsageTypeError,
        r"`scheduler`.*factory returned str",
        starts=True,
    ),
    # target_names shorter than the classes of eval_data; no forward may run
    Refusal(
        "target_names short, tensors",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=tensors(30, seed=2), **SHORT),
        UsageValueError,
        TARGET_NAMES_SHORT,
    ),
    Refusal(
        "target_names short, Dataset of pairs",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=Pairs(30), **SHORT),
        UsageValueError,
        TARGET_NAMES_SHORT,
    ),
    Refusal(
        "target_names short, Dataset with targets",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=WithTargets(30), **SHORT),
        UsageValueError,
        TARGET_NAMES_SHORT,
    ),
    Refusal(
        "target_names short, probing",
        lambda s: fit_probing(s, loss_fn=s.loss_spy, eval_data=Pairs(30), **SHORT),
        UsageValueError,
        TARGET_NAMES_SHORT,
    ),
    # eval_data the evaluation cannot score: refused from a few samples, before training; no forward
    Refusal(
        "eval_data string labels",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=Named(30)),
        UsageTypeError,
        EVAL_LABELS + r"strings \('a'\): map them to class indices.*`target_names`.*" + EVAL_FIXES,
    ),
    Refusal(
        "eval_data regression targets",
        lambda s: fit_probing(s, loss_fn=s.loss_spy, eval_data=regression()),
        UsageTypeError,
        EVAL_LABELS + r"float32 labels: regression targets.*`\.long\(\)`.*" + EVAL_FIXES,
    ),
    Refusal(
        "eval_data multi-hot targets",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=multi_hot()),
        UsageTypeError,
        EVAL_LABELS + r"float32 labels of shape \[3\] per sample, multi-hot: multilabel.*" + EVAL_FIXES,
    ),
    Refusal(
        "eval_data dicts without labels",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=Records(30)),
        UsageValueError,
        r"`eval_data` batches that are dicts to hold `labels` for the classification evaluation, but got "
        r"keys \['label', 'x'\] \(rename `label` to `labels`.*" + EVAL_FIXES,
    ),
    Refusal(
        "eval_data class labels for a language model",
        lambda s: fit_mb(s, loss_fn=s.loss_spy, eval_data=tensors(30), eval_task="causal_lm"),
        UsageTypeError,
        r"`eval_data` labels for the causal_lm evaluation to be token ids \[batch, tokens\].*int64 labels, "
        r"one per sample.*" + EVAL_FIXES,
    ),
    # seeds
    Refusal("seed=-1", lambda s: fit_mb(s, seed=-1), UsageValueError, r"`seed`.*\[0, 2\*\*63\).*-1"),
    Refusal("seed=2**63", lambda s: fit_mb(s, seed=2**63), UsageValueError, rf"`seed`.*{2**63}"),
    Refusal("seed=1.5", lambda s: fit_mb(s, seed=1.5), UsageTypeError, r"`seed`.*1\.5 \(float\)"),
    Refusal("seed='0'", lambda s: fit_mb(s, seed="0"), UsageTypeError, r"`seed`.*'0' \(str\)"),
    Refusal("seed=True", lambda s: fit_mb(s, seed=True), UsageTypeError, r"`seed`.*True \(bool\)"),
    # truthy strings for bools
    Refusal(
        "shuffle str", lambda s: fit_mb(s, shuffle="false"), UsageTypeError, r"`shuffle`.*'false' \(str\)"
    ),
    Refusal(
        "drop_last str", lambda s: fit_mb(s, drop_last="no"), UsageTypeError, r"`drop_last`.*'no' \(str\)"
    ),
    Refusal(
        "progress str", lambda s: fit_mb(s, progress="off"), UsageTypeError, r"`progress`.*'off' \(str\)"
    ),
    Refusal(
        "fit cache str", lambda s: fit_probing(s, cache="false"), UsageTypeError, r"`cache`.*'false' \(str\)"
    ),
    Refusal(
        "probe accumulate str",
        lambda s: probe(s, accumulate="false"),
        UsageTypeError,
        r"`accumulate`.*'false' \(str\)",
    ),
    Refusal("probe cache str", lambda s: probe(s, cache="0"), UsageTypeError, r"`cache`.*'0' \(str\)"),
    # lists and numpy arrays in place of tensors
    *(
        Refusal(
            f"{name} {label}",
            lambda s, key=key, make=make: fit_mb(s, **{key: make(s)}),
            UsageTypeError,
            ARRAYS.format(name=name, kind=kind, types=types),
        )
        for name, key in (("data", "data"), ("eval_data", "eval_data"))
        for label, make, kind, types in (
            ("tuple of lists", lambda s: (s.data[0].tolist(), s.data[1].tolist()), "tuple", "list, list"),
            (
                "tuple of arrays",
                lambda s: (s.data[0].numpy(), s.data[1].numpy()),
                "tuple",
                "ndarray, ndarray",
            ),
            ("list of arrays", lambda s: [s.data[0].numpy(), s.data[1].numpy()], "list", "ndarray, ndarray"),
        )
    ),
    Refusal(
        "probe data tuple of arrays",
        lambda s: autobatch.probe(s.model, (s.data[0].numpy(), s.data[1].numpy())),
        UsageTypeError,
        ARRAYS.format(name="data", kind="tuple", types="ndarray, ndarray"),
    ),
    # keywords
    Refusal(
        "epoch=3",
        lambda s: fit_mb(s, epoch=3),
        UsageTypeError,
        r"unexpected keyword argument `epoch`.*`epochs`",
    ),
    Refusal(
        "step_fn and loss_fn",
        lambda s: fit_mb(s, step_fn=lambda m, b: b, loss_fn=s.loss_spy),
        UsageValueError,
        r"one of `step_fn` and `loss_fn`, but got both",
    ),
    Refusal(
        "probe step_fn and loss_fn",
        lambda s: probe(s, step_fn=lambda m, b: b, loss_fn=s.loss_spy),
        UsageValueError,
        r"`step_fn` and `loss_fn`",
    ),
    Refusal(
        "eval_batch without eval_data",
        lambda s: fit_mb(s, eval_batch=16),
        UsageValueError,
        r"`eval_data` with `eval_batch`, but got no eval_data",
    ),
    Refusal(
        "predict_fn without eval_data",
        lambda s: fit_mb(s, predict_fn=lambda m, b: b),
        UsageValueError,
        r"`eval_data` with `predict_fn`",
    ),
    Refusal(
        "target_names without eval_data",
        lambda s: fit_mb(s, target_names=NAMES),
        UsageValueError,
        r"`eval_data` with `target_names`",
    ),
    # try_batch
    Refusal(
        "try_batch above the dataset",
        lambda s: try_batch(s, SAMPLES + 1),
        UsageValueError,
        rf"`batch_size`.*at most the dataset size {SAMPLES}.*{SAMPLES + 1}",
    ),
    Refusal(
        "try_batch max_batch",
        lambda s: try_batch(s, 4, max_batch=8),
        UsageTypeError,
        r"try_batch\(\) got an unexpected keyword argument `max_batch`",
    ),
    Refusal(
        "try_batch margin",
        lambda s: try_batch(s, 4, margin=0.1),
        UsageTypeError,
        r"try_batch\(\) got an unexpected keyword argument `margin`",
    ),
]


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in REFUSALS])
def test_refused_before_anything_is_touched(case: Refusal) -> None:
    model = mlp()
    # Mixed train/eval flags, so that a stray model.train() or model.eval() shows.
    model.eval()
    model[0].train()
    # A pending gradient (mid-accumulation) that must survive, and parameters without one.
    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    setup = Setup(model, optimizer, tensors())
    if case.before is not None:
        setup.made = case.before(setup)
    groups = group_settings(optimizer)
    untouched = Untouched(model)
    with pytest.raises(case.error, match=case.match):
        case.call(setup)
    untouched.assert_unchanged(moved=case.starts)
    assert not setup.forwards, "a forward ran before the call was refused"
    assert group_settings(optimizer) == groups, "the optimizer's hyper-parameters changed"
    assert not optimizer.state


def test_usage_errors_are_value_and_type_errors() -> None:
    assert issubclass(UsageValueError, ValueError) and issubclass(UsageTypeError, TypeError)
    assert autobatch.UsageValueError is UsageValueError and autobatch.UsageTypeError is UsageTypeError


# -- meta models --------------------------------------------------------------------------------------


def meta_in_context() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))


@pytest.mark.parametrize("make", [meta_in_context, lambda: mlp().to("meta")], ids=["context", "to-meta"])
@pytest.mark.parametrize("entry", [fit_mb, fit_probing, probe], ids=["fit micro_batch", "fit", "probe"])
def test_a_model_on_the_meta_device_is_refused(make: Callable[[], nn.Module], entry: Any) -> None:
    model = make()
    generators = Generators()
    with pytest.raises(UsageValueError, match=r"`model` to hold its weights.*meta device.*to_empty"):
        entry(Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), tensors()))
    generators.assert_unchanged()
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


# -- outputs the default loss cannot take: found by the first forward ----------------------------------


class Wrapped(nn.Module):
    """Logits behind a BatchNorm (whose training forward updates its buffers), wrapped in a dict, tuple or
    object with ``.logits``."""

    def __init__(self, wrap: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wrap = wrap
        self.fc = nn.Linear(FEATURES, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.out(torch.relu(self.bn(self.fc(x))))
        if self.wrap == "dict":
            return {"logits": logits}
        if self.wrap == "tuple":
            return logits, x
        return SimpleNamespace(logits=logits)


WRAPS = {
    "dict": r"a dict with keys \['logits'\].*loss_fn=.*cross_entropy\(outputs\['logits'\], targets\)",
    "tuple": r"a tuple of 2.*loss_fn=.*cross_entropy\(outputs\[0\], targets\)",
    "logits": r"a SimpleNamespace.*loss_fn=.*cross_entropy\(outputs\.logits, targets\)",
}
ENTRIES = {"probe": probe, "fit": fit_probing, "fit micro_batch": fit_mb}


@dataclass
class BufferWatch:
    """Records, after each BatchNorm forward, whether its running statistics had moved from the start."""

    start: torch.Tensor
    moved: list[bool] = field(default_factory=list)

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.moved.append(not torch.equal(module.running_mean, self.start))


@pytest.mark.filterwarnings("ignore:1 BatchNorm layer")
@pytest.mark.parametrize("entry", ENTRIES.values(), ids=ENTRIES.keys())
@pytest.mark.parametrize(("wrap", "match"), WRAPS.items(), ids=WRAPS.keys())
def test_an_output_the_default_loss_cannot_take_is_refused_and_undone(
    wrap: str, match: str, entry: Any
) -> None:
    model = Wrapped(wrap)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    watch = BufferWatch(model.bn.running_mean.clone())
    untouched = Untouched(model)
    model.bn.register_forward_hook(watch)
    with pytest.raises(UsageTypeError, match=match):
        entry(Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), tensors()))
    assert watch.moved and all(watch.moved), "the forward did not change the BatchNorm buffers"
    # fit moves the model (a no-op move on the CPU) before its first forward; Session.start undoes the rest.
    untouched.assert_unchanged(moved=entry is not probe)


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(probe, id="probe"),
        pytest.param(fit_probing, id="fit"),
        pytest.param(fit_mb, id="fit micro_batch"),
    ],
)
@pytest.mark.filterwarnings("ignore:1 BatchNorm layer")
def test_an_output_refused_at_the_first_forward_leaves_eval_mode(entry: Any) -> None:
    model = Wrapped("tuple")
    model.eval()
    with pytest.raises(UsageTypeError, match=r"outputs\[0\]"):
        entry(Setup(model, torch.optim.SGD(model.parameters(), lr=0.1), tensors()))
    assert [m.training for m in model.modules()] == [False] * 4


# -- datasets that augment at random --------------------------------------------------------------------


AUGMENTED_REFUSALS = {
    # refused by the options' checks, before any sample is read
    "bad seed": (Augmenting, {"seed": -1}, r"`seed`.*-1", False),
    # refused by resolve after reading samples of `data`, and of `eval_data`
    "unlabelled data": (Unlabelled, {}, r"`data` samples.*pairs or dicts.*step_fn", True),
    "target_names short": (Augmenting, SHORT, TARGET_NAMES_SHORT, True),
}


@pytest.mark.parametrize(
    ("train", "options", "match", "reads"), AUGMENTED_REFUSALS.values(), ids=AUGMENTED_REFUSALS.keys()
)
def test_a_refusal_leaves_the_generators_of_an_augmenting_dataset(
    train: Callable[[], Pairs], options: dict[str, Any], match: str, reads: bool
) -> None:
    model = mlp()
    data, eval_data = train(), Augmenting(30)
    untouched = Untouched(model)
    with pytest.raises(UsageValueError, match=match):
        fit_mb(
            Setup(model, torch.optim.SGD(model.parameters()), tensors()),
            data=data,
            eval_data=eval_data,
            **options,
        )
    untouched.assert_unchanged()
    if reads:
        assert data.reads + eval_data.reads > 0, "no sample was read: the test proves nothing"


def test_a_probe_leaves_the_generators_of_an_augmenting_dataset() -> None:
    model = mlp()
    data = Augmenting(48)
    untouched = Untouched(model)
    result = autobatch.probe(model, data, precision="fp32", memory_limit=LIMIT)
    assert 2 <= result.micro_batch <= len(data)
    assert data.reads > 0
    untouched.assert_unchanged()


# -- a target far above the dataset ----------------------------------------------------------------------


def test_a_huge_target_batch_trains_one_step_per_epoch_without_listing_its_chunks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    X, y = tensors()
    before = [p.detach().clone() for p in model.parameters()]
    result = autobatch.fit(
        model,
        (X, y),
        target_batch=10**10,
        micro_batch=4,
        epochs=2,
        device="cpu",
        precision="fp32",
        progress=False,
        seed=0,
    )
    assert result.plan.accumulation_steps == 2_500_000_000
    assert result.plan.micro_batch == 4 and result.plan.effective_batch == 10**10
    assert result.optimizer_steps == 2 and result.samples == 2 * SAMPLES and len(result.losses) == 2
    assert all(np.isfinite(result.losses))
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


# -- the signature and the docs -------------------------------------------------------------------------


def test_fit_signature_lists_the_options_with_their_defaults() -> None:
    parameters = inspect.signature(autobatch.fit).parameters
    assert list(parameters)[:3] == ["model", "data", "target_batch"]
    assert parameters["target_batch"].default == 32
    expected = {
        "epochs": 1,
        "margin": 0.0,
        "memory_limit": None,
        "target_names": None,
        "micro_batch": None,
        "seed": None,
        "drop_last": False,
        "cache": True,
        "precision": "auto",
    }
    for name, default in expected.items():
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert parameters[name].default == default, name
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def options_section(fn: Callable[..., Any]) -> str:
    text = pydoc.render_doc(fn, renderer=pydoc.plaintext)
    found = re.search(r"Options \(keyword only\):\n(.*)", text, re.DOTALL)
    assert found, "help() shows no Options section"
    return found.group(1)


@pytest.mark.parametrize("entry", ["fit", "probe", "try_batch"])
def test_help_has_an_options_section_naming_every_option(entry: str) -> None:
    fn = getattr(autobatch, entry)
    section = options_section(fn)
    own = {"model", "data", "batch_size", "steps"} | ({"target_batch"} if entry == "fit" else set())
    keywords = [n for n in inspect.signature(fn).parameters if n not in own]
    assert keywords == [f.name for f in entry_fields(entry) if f.name not in own]
    for name in keywords:
        assert re.search(rf"^\s+{name}: \S", section, re.MULTILINE), f"{name} is not in help({entry})"
    if entry == "fit":
        for name in ("epochs", "margin", "memory_limit", "target_names", "scheduler", "seed", "eval_data"):
            assert name in keywords


def test_options_an_entry_does_not_take_are_not_in_its_help() -> None:
    assert not re.search(r"^\s+(max_batch|margin): ", options_section(autobatch.try_batch), re.MULTILINE)
    assert not re.search(r"^\s+(accumulate|scaler): ", options_section(autobatch.fit), re.MULTILINE)
