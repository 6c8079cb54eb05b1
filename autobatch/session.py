"""One setup for every entry point: :func:`resolve` checks everything, :meth:`Session.start` acts.

:func:`resolve` runs every check of a call — the options, the model, the device, the optimizer and the
scheduler, the data and the evaluation data — and changes nothing: no model is moved, no generator is
seeded or drawn from (samples are read under :func:`~autobatch.step.state.preserved_rng`), no process group
is created, no optimizer is built. It applies one device and memory policy (:mod:`autobatch.memory.device`)
that the probe and the training loop share. :meth:`Session.start` then takes the actions, in order, and undoes
them if anything fails before training begins.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from autobatch import distributed
from autobatch.errors import UsageTypeError, UsageValueError
from autobatch.memory.device import DeviceMemory, resolve_memory_limit
from autobatch.memory.threads import cpu_threads
from autobatch.options import Options
from autobatch.planner import plan
from autobatch.step.data import DataSource, as_source
from autobatch.step.state import preserved_rng, restore_rng, rng_state
from autobatch.step.stepper import resolve_precision, smallest_batch
from autobatch.training.evalcheck import check_eval_data
from autobatch.training.metrics import eval_kind

__all__ = ["Session", "bind_scheduler", "resolve", "resolve_model"]


@dataclass
class Session:
    """A checked setup: what :func:`resolve` found, and what :meth:`start` made of it.

    Attributes:
        options: the checked options of the call.
        model: the module that trains (unwrapped from a user's DDP wrapper).
        ddp: the DDP wrapper the forward runs through (the user's, or made by :meth:`start` for fit).
        device: the device to run on.
        precision: the resolved precision.
        memory: the device memory, with the resolved limit.
        optimizer: the user's optimizer; after :meth:`start`, the default one if none was given.
        source: the training data; ``eval_source`` the evaluation data, if any.
        eval_kind: the evaluation that runs on it (:func:`autobatch.training.metrics.eval_kind`).
        floor: the smallest micro-batch the model can train on (2 with BatchNorm).
        world_size: the ranks expected (the group's size once started).
    """

    options: Options
    model: nn.Module
    ddp: Any
    device: torch.device
    precision: str
    memory: DeviceMemory
    optimizer: torch.optim.Optimizer | None
    source: DataSource
    eval_source: DataSource | None
    floor: int
    world_size: int
    group: distributed.Group | None = None
    scheduler: Any = None
    order_seed: int = 0
    sync_buffers: bool = False
    cpu_threads: int | None = None
    eval_kind: str = "classification"
    _undo: list[Any] = field(default_factory=list, repr=False)

    @property
    def is_main(self) -> bool:
        """Whether this process logs and prints (rank 0, or a single process)."""
        return self.group is None or self.group.is_main

    @contextlib.contextmanager
    def start(self) -> Iterator[Session]:
        """Create the process group, then (fit) seed, move the model, build the optimizer and scheduler.

        Every rank checks that the others have the same data and options. If anything fails inside the
        block before :meth:`training_began`, the model goes back to its device and the generators and
        the optimizer's hyper-parameters to their states, as if the call had been refused.
        """
        fit = self.options.entry == "fit"
        saved = _Saved.take(self.model, self.optimizer) if fit else None
        self._undo = [saved] if saved is not None else []
        with cpu_threads(self.options.memory.cpu_threads, self.device) as threads:
            self.cpu_threads = threads
            try:
                # A prediction is host work on fake copies: each rank predicts alone, with no group.
                self.group = None if self.options.entry == "predict" else distributed.setup(self.device)
                if self.group is not None:
                    self._check_ranks_agree()
                if fit:
                    self._start_training()
                yield self
            except BaseException:
                for undo in self._undo:
                    undo.restore()
                raise

    def training_began(self) -> None:
        """From here on, a failure leaves the model where training left it."""
        self._undo = []

    def _check_ranks_agree(self) -> None:
        assert self.group is not None
        train = self.options.train
        checks = {
            "dataset length (`data`)": len(self.source),
            "evaluation dataset length (`eval_data`)": len(self.eval_source) if self.eval_source else 0,
            "`target_batch`": train.target_batch,
            "`epochs`": train.epochs,
            "`drop_last`": int(train.drop_last),
            "`micro_batch`": train.micro_batch or 0,
        }
        for what, value in checks.items():
            self.group.check_same(what, int(value))

    def _start_training(self) -> None:
        train = self.options.train
        if train.seed is not None:
            torch.manual_seed(train.seed)
            random.seed(train.seed)
            np.random.seed(train.seed % 2**32)
        self.order_seed = train.seed if train.seed is not None else int(torch.randint(2**62, ()).item())
        self.model.to(self.device)
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                [p for p in self.model.parameters() if p.requires_grad], lr=1e-3
            )
        self.scheduler = bind_scheduler(train.scheduler, self.optimizer)
        if self.group is not None:
            self.order_seed = int(self.group.broadcast(self.order_seed))
            if self.ddp is None:
                self.ddp = distributed.wrap(self.model, self.device)
                self.sync_buffers = True  # what DDP's default broadcast_buffers=True gives, at a safe point
            else:
                self.sync_buffers = distributed.syncs_buffers(self.ddp)


@dataclass
class _Saved:
    """What :meth:`Session.start` changes: undone when the call fails before training begins."""

    model: nn.Module
    devices: list[tuple[torch.Tensor, torch.device]]
    buffers: list[tuple[torch.Tensor, torch.Tensor]]
    modes: list[tuple[nn.Module, bool]]
    rng: Any
    optimizer: torch.optim.Optimizer | None
    groups: list[dict[str, Any]]

    @classmethod
    def take(cls, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> _Saved:
        groups = []
        if optimizer is not None:
            groups = [
                copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups
            ]
        devices = [(t, t.device) for t in [*model.parameters(), *model.buffers()]]
        # Buffers are small and a forward changes them (BatchNorm statistics) before a step can fail.
        buffers = [(b, b.detach().to("cpu", copy=True)) for b in model.buffers()]
        modes = [(m, m.training) for m in model.modules()]  # the loop puts the model in train mode
        return cls(model, devices, buffers, modes, rng_state(), optimizer, groups)

    def restore(self) -> None:
        places = {device for _, device in self.devices}
        if len(places) == 1:
            self.model.to(places.pop())  # moves pending gradients too
        else:
            for tensor, device in self.devices:
                if tensor.device != device:
                    tensor.data = tensor.data.to(device)
        with torch.no_grad():
            for buffer, data in self.buffers:
                buffer.copy_(data)
        for module, training in self.modes:
            module.training = training
        restore_rng(self.rng)
        if self.optimizer is not None:
            for group, saved in zip(self.optimizer.param_groups, self.groups, strict=True):
                params = group["params"]
                group.clear()
                group.update(copy.deepcopy(saved))
                group["params"] = params


def bind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> Any:
    """The scheduler of ``optimizer``: an instance as given, or what a factory returns (checked)."""
    if scheduler is None:
        return None
    if callable(getattr(scheduler, "step", None)) and hasattr(scheduler, "optimizer"):
        made = scheduler
    else:
        made = scheduler(optimizer)
    if not (callable(getattr(made, "step", None)) and hasattr(made, "optimizer")):
        raise UsageTypeError(
            f"Expected `scheduler` to make an LR scheduler of the optimizer, but the factory returned "
            f"{type(made).__name__}."
        )
    if type(made).__name__ == "ReduceLROnPlateau":
        raise UsageValueError(
            "`scheduler` made a ReduceLROnPlateau, which steps on a metric that fit does not have. Step it "
            "yourself after each epoch, or pass a scheduler that steps per optimizer step."
        )
    if made.optimizer is not optimizer:
        raise UsageValueError(
            "Expected `scheduler` to schedule the optimizer fit trains with, but it is bound to another "
            "optimizer. Pass `optimizer=` the one it was made for, or a factory: "
            "scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10)."
        )
    return made


# -- resolve --------------------------------------------------------------------------------------------
def default_device() -> torch.device:
    """CUDA when available, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_device_available(device: torch.device, given: Any) -> torch.device:
    """``device`` if this machine has it (a bare ``"cuda"`` becomes the current GPU), else a usage error."""
    if device.type == "meta":
        raise UsageValueError(
            f"Expected `device` to be a device that can train, but got {str(given)!r}: meta tensors hold no "
            "data. Use 'cuda' or 'cpu'."
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageValueError(f"`device` is {str(given)!r} but CUDA is not available here; use 'cpu'.")
        if device.index is None:
            local = distributed.local_device()  # cuda:LOCAL_RANK under torchrun
            device = local if local is not None else torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            raise UsageValueError(
                f"`device` is {str(given)!r} but this machine has {torch.cuda.device_count()} CUDA device(s)."
            )
        return device
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise UsageValueError(
            f"`device` is {str(given)!r} but no {device.type} device is available here; use 'cpu'."
        )
    return device


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return None


def _check_model(model: Any, entry: str) -> tuple[nn.Module, Any]:
    if not isinstance(model, nn.Module):
        raise UsageTypeError(f"Expected `model` to be a torch.nn.Module, but got {type(model).__name__}.")
    module, ddp = distributed.unwrap(model)
    lazy = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if is_lazy(t)]
    if lazy:  # refused, not materialised here: a forward would change the model a refused call must not
        shown = ", ".join(lazy[:4]) + (f" and {len(lazy) - 4} more" if len(lazy) > 4 else "")
        raise UsageValueError(
            f"Expected `model` to have initialised parameters, but {type(module).__name__} has lazy modules "
            f"whose parameters are not initialised yet ({shown}): their shapes, and so the memory a step "
            "takes, are known only after a first forward. Run one forward on a sample first, on the device "
            "it trains on: model(sample), e.g. model(X[:2]) for tensors (X, y); then build its optimizer, "
            "as torch documents for lazy modules."
        )
    # A prediction copies the model as shapes alone: weights on the meta device do.
    if entry != "predict" and any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
        raise UsageValueError(
            f"Expected `model` to hold its weights, but {type(module).__name__} has parameters on the meta "
            "device. Materialise it first, e.g. model.to_empty(device='cpu') then load or initialise them."
        )
    if not any(p.requires_grad for p in module.parameters()):
        raise UsageValueError(
            f"Expected `model` to have trainable parameters, but {type(module).__name__} has none "
            "(all parameters have requires_grad=False, or it has no parameters)."
        )
    return module, ddp


def _check_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is None:
        return
    owned = {id(p) for p in module.parameters()}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    foreign = sum(id(p) not in owned for p in held)
    if foreign or not any(p.requires_grad for p in held):
        raise UsageValueError(
            "Expected `optimizer` to hold the model's trainable parameters, but "
            + (f"{foreign} of its {len(held)} parameters are not the model's" if foreign else "it holds none")
            + ". Create it from this model: torch.optim.AdamW(model.parameters())."
        )


def _target_device(options: Options, module: nn.Module) -> torch.device:
    """fit: the given device, else this rank's GPU, else the default; probe: the given one or the model's;
    predict: the CPU (fake copies of the model, wherever it lives)."""
    if options.entry == "predict":
        return torch.device("cpu")
    given = options.memory.device
    here = _model_device(module)
    if options.entry == "fit":
        if given is None:
            local = distributed.local_device()
            return local if local is not None else check_device_available(default_device(), "default")
        return check_device_available(torch.device(given), given)
    if given is None:
        return here if here is not None else torch.device("cpu")
    dev = check_device_available(torch.device(given), given)
    if here is not None and (here.type, here.index or 0) != (dev.type, dev.index or 0):
        raise UsageValueError(
            f"The model lives on {here} but `device` is {dev}: move it first with model.to({str(dev)!r}) "
            "(before creating its optimizer), or leave `device` unset."
        )
    return dev


def resolve_model(
    model: Any, optimizer: Any, options: Options
) -> tuple[nn.Module, Any, torch.device, str, int | None]:
    """Check the model, its optimizer, the device, the precision and the limit; changes nothing.

    Returns:
        The module (unwrapped from a user's DDP), the DDP wrapper (or ``None``), the device, the resolved
        precision and the memory limit in bytes (``None``: none).
    """
    module, ddp = _check_model(model, options.entry)
    device = _target_device(options, module)
    precision = resolve_precision(options.step.precision, device)
    _check_optimizer(module, optimizer)
    if options.entry == "fit":
        _check_fit(module, device, optimizer, options)
    return module, ddp, device, precision, resolve_memory_limit(options.memory.memory_limit)


def resolve(model: Any, data: Any, options: Options) -> Session:
    """Check the whole call: the options (already checked alone), the model, device, data and evaluation.

    Changes nothing; :meth:`Session.start` acts.

    Raises:
        UsageTypeError, UsageValueError: the first problem found, naming the argument, what was expected
            and what was got.
    """
    module, ddp, device, precision, limit = resolve_model(model, options.step.optimizer, options)
    optimizer = options.step.optimizer
    world_size = distributed.expected_world_size()
    kind = eval_kind(module, options.eval.eval_task, options.eval.predict_fn)
    with preserved_rng():  # reading samples must not draw from the generators of an augmenting dataset
        source = as_source(data)
        if options.step.step_fn is None:
            source.check_labelled()
        eval_source = _eval_source(options, kind)
    if eval_source is not None and options.eval.target_names is not None and kind.endswith("_lm"):
        raise UsageValueError(
            f"Expected no `target_names` for {type(module).__name__}, a language model (its evaluation "
            "reports loss, perplexity and token accuracy, not classes); pass eval_task='classification' "
            "to score it as a classifier."
        )
    floor = min(smallest_batch(module), len(source))
    if options.entry == "fit":
        plan(1, options.train.target_batch, world_size)  # a target the ranks cannot share
        if len(source) < world_size:
            raise UsageValueError(
                f"Expected `data` to hold at least one sample per rank ({world_size}), but got {len(source)}."
            )
        if smallest_batch(module) > len(source):
            raise UsageValueError(
                f"Expected `data` to hold at least 2 samples: {type(module).__name__} has BatchNorm layers, "
                f"which cannot train on one sample, but got {len(source)}."
            )
    return Session(
        options=options,
        model=module,
        ddp=ddp,
        device=device,
        precision=precision,
        memory=DeviceMemory(device, limit, options.memory.emulation),
        optimizer=optimizer,
        source=source,
        eval_source=eval_source,
        eval_kind=kind,
        floor=floor,
        world_size=world_size,
    )


def _check_fit(
    module: nn.Module, device: torch.device, optimizer: torch.optim.Optimizer | None, options: Options
) -> None:
    """What only fit needs: the optimizer's state can move, and a scheduler instance fits the optimizer."""
    moves = any(p.device != device for p in module.parameters())
    if optimizer is not None and any(optimizer.state.values()) and moves:
        raise UsageValueError(
            f"`optimizer` already holds state for parameters that are not on {device}; move the model "
            "before creating its optimizer, or pass `device` matching the model."
        )
    scheduler = options.train.scheduler
    is_instance = callable(getattr(scheduler, "step", None)) and hasattr(scheduler, "optimizer")
    if is_instance and (optimizer is None or scheduler.optimizer is not optimizer):
        raise UsageValueError(
            "Expected `scheduler` to schedule the optimizer fit trains with, but it is bound to another "
            "optimizer"
            + (" (fit builds its own AdamW when `optimizer` is not given)" if optimizer is None else "")
            + ". Pass the optimizer it was made for, or a factory: "
            "scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10)."
        )


def _eval_source(options: Options, kind: str) -> DataSource | None:
    evaluation = options.eval
    if evaluation.eval_data is None:
        return None
    source = as_source(evaluation.eval_data, name="eval_data")
    if evaluation.predict_fn is None:
        source.check_labelled()
    check_eval_data(source, kind)  # a few samples: what fails here would fail only after an epoch
    names = evaluation.target_names
    if names is not None and evaluation.predict_fn is None:
        largest = source.largest_label()
        if largest is not None and largest >= len(names):
            raise UsageValueError(
                f"Expected `target_names` to name every class 0..{largest} of `eval_data`, but got "
                f"{len(names)} names."
            )
    return source
