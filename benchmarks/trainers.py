"""Batch finders side by side on one emulated device: autobatch's integrations against the Hugging Face
Trainer's ``auto_find_batch_size``, Lightning's ``Tuner.scale_batch_size`` and Accelerate's
``find_executable_batch_size``.

Two workloads, each asked for an effective batch of 32 with AdamW in fp32 for one epoch: a 2-layer, 32-wide
BERT classifier built from a config (384 samples of skewed lengths, padded per batch, 8 MiB) and
autobatch's digits CNN (1347 8×8 images, 640 KiB). Every baseline trains inside one emulated device (ideal
mode: live tensor bytes, entered around the whole call with the model's parameters and buffers resident)
whose out-of-memory error is worded as CUDA's, so that every tool recognises it (Lightning's
``is_oom_error`` and accelerate 1.1's need "CUDA" in the message), and which counts the errors it raised.
autobatch's integrations run under the same limit and mode through their own ``memory_limit=``; Lightning's
``AutoBatch`` then trains inside the same device as the baselines.

For each tool: the micro-batch it trains at in the end, the effective batch (micro-batch × accumulation),
the out-of-memory errors and tries (restarts, trials), the optimizer steps applied in all against the
steps of the final run (a restart re-applies steps to weights already updated), the seconds from the call
until training runs in its final configuration, and whether every full step had the target's 32 samples.
Figures, not pass/fail (2 busy cores: ±30 % on the seconds).

Run from the repository root: ``python benchmarks/trainers.py [--json]`` (needs the ``hf`` and
``lightning`` extras).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from transformers import (
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests package

from autobatch.demo import DigitsCNN, load_digits_data
from autobatch.integrations.lightning import AutoBatch
from autobatch.integrations.transformers import AutoBatchTrainer
from autobatch.memory.emulate import EmulatedDevice
from tests.hf_fixtures import bert_classifier, classification_samples, padding_collator
from tests.integrations.pl_helpers import trainer as lightning_trainer

TARGET = 32


class Device(EmulatedDevice):
    """An ideal-mode emulated device whose out-of-memory reads as CUDA's, counting the errors it raises."""

    def __init__(self, limit: int, resident: list[torch.Tensor]) -> None:
        super().__init__(limit, resident)
        self.ooms = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except torch.OutOfMemoryError as exc:
            self.ooms += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. {exc}") from None


def resident(model: nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


@dataclass
class Row:
    model: str
    tool: str
    micro: int
    effective: int
    ooms: int
    tries: int
    steps_applied: int
    steps_kept: int
    seconds_to_full_speed: float
    seconds: float
    exact: bool
    note: str = ""


# -- the workloads ----------------------------------------------------------------------------------------
class CNN(nn.Module):
    """autobatch's digits CNN with a Hugging Face style output (a dict with the loss)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = DigitsCNN()

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, Any]:
        logits = self.net(pixel_values)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def digits() -> list[dict[str, Any]]:
    X, y = load_digits_data().train
    return [{"pixel_values": X[i], "labels": int(y[i])} for i in range(len(y))]


@dataclass
class Workload:
    name: str
    make: Callable[[], nn.Module]
    data: Callable[[], list[Any]]
    collate: Callable[[], Any]
    limit: int


WORKLOADS = [
    Workload("BERT", bert_classifier, lambda: classification_samples(384), padding_collator, 8 << 20),
    Workload("CNN", CNN, digits, lambda: default_data_collator, 640 << 10),
]


# -- Hugging Face ---------------------------------------------------------------------------------------
class Clock(TrainerCallback):
    """Optimizer steps, restarts, and when the last (re)start's first step ran."""

    def __init__(self, t0: float) -> None:
        self.t0, self.begins, self.steps, self.full_speed = t0, 0, 0, float("nan")
        self._first = True

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.begins += 1
        self._first = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1
        if self._first:
            self.full_speed, self._first = time.perf_counter() - self.t0, False


def hf_arguments(**overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = dict(
        output_dir=tempfile.mkdtemp(prefix="trainers-"),
        per_device_train_batch_size=TARGET,
        num_train_epochs=1,
        optim="adamw_torch",
        learning_rate=1e-3,
        max_grad_norm=1.0,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def hf_auto_find(w: Workload) -> Row:
    model, args = w.make(), hf_arguments(auto_find_batch_size=True)
    t0 = time.perf_counter()
    clock = Clock(t0)
    trainer = Trainer(
        model=model, args=args, train_dataset=w.data(), data_collator=w.collate(), callbacks=[clock]
    )
    trainer.remove_callback(PrinterCallback)
    with Device(w.limit, resident(model)) as device:
        trainer.train()
    micro = trainer.state.train_batch_size
    return Row(
        w.name,
        "HF `auto_find_batch_size`",
        micro,
        micro,
        device.ooms,
        clock.begins,
        clock.steps,
        trainer.state.global_step,
        clock.full_speed,
        time.perf_counter() - t0,
        micro == TARGET,
        f"{clock.begins - 1} restarts; the steps before the last one stay in the weights",
    )


def hf_autobatch(w: Workload) -> Row:
    model, args = w.make(), hf_arguments()
    t0 = time.perf_counter()
    clock = Clock(t0)
    sizes: list[int] = []

    class Sizes(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            sizes.append(sum(trainer.micro_batches))

    trainer = AutoBatchTrainer(
        model=model,
        args=args,
        train_dataset=w.data(),
        data_collator=w.collate(),
        callbacks=[clock, Sizes()],
        memory_limit=w.limit,
        emulation="ideal",
        cache=False,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    probe = trainer.probe_result
    assert probe is not None
    return Row(
        w.name,
        "autobatch `AutoBatchTrainer`",
        probe.micro_batch,
        TARGET,
        probe.ooms + len(trainer.backoffs),
        len(probe.trials),
        clock.steps,
        trainer.state.global_step,
        clock.full_speed,
        time.perf_counter() - t0,
        all(s == TARGET for s in sizes[:-1]) and sizes[-1] <= TARGET,
        f"probe {probe.seconds:.1f} s; the epoch's last step has {sizes[-1]} samples",
    )


# -- Lightning ------------------------------------------------------------------------------------------
class LitModule(pl.LightningModule):
    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.model = w.make()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss: torch.Tensor = self.model(**batch)["loss"]
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class LitData(pl.LightningDataModule):
    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.samples, self.collate, self.batch_size = w.data(), w.collate(), TARGET

    def train_dataloader(self) -> torch.utils.data.DataLoader[Any]:
        return torch.utils.data.DataLoader(
            self.samples, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate
        )


class LitClock(pl.Callback):
    def __init__(self, t0: float) -> None:
        self.t0, self.steps, self.full_speed, self.samples, self._pending = t0, 0, float("nan"), [], 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._pending += len(batch["labels"])

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self.steps += 1
        self.samples.append(self._pending)
        self._pending = 0
        if self.steps == 1:
            self.full_speed = time.perf_counter() - self.t0


def lightning_tuner(w: Workload, mode: str) -> Row:
    from lightning.pytorch.tuner import Tuner, batch_size_scaling

    pl.seed_everything(0, verbose=False)
    module, data = LitModule(w), LitData(w)
    t0 = time.perf_counter()
    clock = LitClock(t0)
    trainer = lightning_trainer([clock], max_epochs=1)
    tries, real = [0], batch_size_scaling._try_loop_run

    def counted(*args: Any, **kwargs: Any) -> Any:
        tries[0] += 1
        return real(*args, **kwargs)

    batch_size_scaling._try_loop_run = counted
    try:
        with Device(w.limit, resident(module)) as device:
            found = Tuner(trainer).scale_batch_size(module, datamodule=data, mode=mode)
            trainer.fit(module, datamodule=data)
    finally:
        batch_size_scaling._try_loop_run = real
    accumulate = trainer.accumulate_grad_batches
    found = int(found or 0)
    return Row(
        w.name,
        f"Lightning `scale_batch_size` ({mode})",
        found,
        found * accumulate,
        device.ooms,
        tries[0],
        clock.steps,
        trainer.global_step,
        clock.full_speed,
        time.perf_counter() - t0,
        found * accumulate == TARGET,
        f"accumulate_grad_batches stays {accumulate}",
    )


def lightning_autobatch(w: Workload) -> Row:
    class Emulate(pl.Callback):
        """Train (after the probe) inside the same emulated device as the baselines."""

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            optimizer = trainer.optimizers[0]
            state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            self.device = Device(w.limit, [*resident(pl_module), *state])
            self.device.__enter__()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.device.__exit__(None, None, None)

    pl.seed_everything(0, verbose=False)
    module, data = LitModule(w), LitData(w)
    t0 = time.perf_counter()
    clock, emulate = LitClock(t0), Emulate()
    callback = AutoBatch(target_batch=TARGET, memory_limit=w.limit, emulation="ideal", cache=False)
    trainer = lightning_trainer([clock, callback, emulate], max_epochs=1)
    trainer.fit(module, datamodule=data)
    probe = callback.probe_result
    assert probe is not None and callback.micro_batch is not None and callback.accumulate is not None
    return Row(
        w.name,
        "autobatch `AutoBatch` (Lightning)",
        callback.micro_batch,
        callback.micro_batch * callback.accumulate,
        probe.ooms + emulate.device.ooms,
        len(probe.trials),
        clock.steps,
        trainer.global_step,
        clock.full_speed,
        time.perf_counter() - t0,
        all(s == TARGET for s in clock.samples[:-1]),
        f"probe {probe.micro_batch} → {callback.micro_batch} × {callback.accumulate} (a divisor of 32); the "
        f"last step has {clock.samples[-1]} samples",
    )


# -- Accelerate -----------------------------------------------------------------------------------------
def accelerate_find(w: Workload, start: int) -> Row:
    from accelerate.utils import find_executable_batch_size

    model, data, collate = w.make(), w.data(), w.collate()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    record: dict[str, Any] = {"tries": 0, "steps": 0, "last": 0, "full": float("nan"), "micro": 0}

    @find_executable_batch_size(starting_batch_size=start)
    def train(batch_size: int) -> None:  # the usual pattern: the user's loop, restarted on an OOM
        record.update(tries=record["tries"] + 1, micro=batch_size, last=0)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(0),
        )
        model.train()
        for batch in loader:
            model(**batch)["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record.update(steps=record["steps"] + 1, last=record["last"] + 1)
            if record["last"] == 1:
                record["full"] = time.perf_counter() - t0

    with Device(w.limit, resident(model)) as device:
        train()
    micro = record["micro"]
    return Row(
        w.name,
        f"accelerate `find_executable_batch_size` (from {start})",
        micro,
        micro,
        device.ooms,
        record["tries"],
        record["steps"],
        record["last"],
        record["full"],
        time.perf_counter() - t0,
        micro == TARGET,
        "0.9 × per OOM; each try restarts the epoch on updated weights",
    )


TOOLS: list[Callable[[Workload], Row]] = [
    hf_auto_find,
    hf_autobatch,
    lambda w: lightning_tuner(w, "power"),
    lambda w: lightning_tuner(w, "binsearch"),
    lightning_autobatch,
    lambda w: accelerate_find(w, 128),
    lambda w: accelerate_find(w, TARGET),
]


def table(rows: list[Row]) -> str:
    lines = [
        "| model | tool | micro-batch | effective batch | OOMs | tries | steps applied / kept "
        "| s to full speed | = target |",
        "|---|---|--:|--:|--:|--:|--:|--:|:-:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.tool} | {r.micro} | {r.effective} | {r.ooms} | {r.tries} | "
            f"{r.steps_applied} / {r.steps_kept} | {r.seconds_to_full_speed:.1f} | "
            f"{'yes' if r.exact else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "autobatch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = []
    for workload in WORKLOADS:
        for tool in TOOLS:
            rows.append(tool(workload))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return
    print(table(rows))
    print()
    for r in rows:
        print(f"- {r.model}, {r.tool}: {r.note}")


if __name__ == "__main__":
    main()
