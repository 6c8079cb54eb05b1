"""What each rank of :mod:`tests.integrations.test_distributed` runs (importable, so that spawned ranks
unpickle it): AutoBatchTrainer and Lightning's AutoBatch under DDP on gloo, with torchrun's environment."""

from __future__ import annotations

import os
import tempfile
from typing import Any

N = 96  # three steps of 32 an epoch, two epochs
PER_DEVICE = 4  # HF: 4 × 4 accumulated × 2 ranks = 32


def hf(rank: int, oom_rank: int = 1) -> dict[str, Any]:
    """AutoBatchTrainer written for 4 × 4 × 2 ranks, 8 MiB; an out-of-memory on one rank in step 2."""
    from autobatch.integrations.transformers import AutoBatchTrainer
    from tests.hf_fixtures import classification_samples, padding_collator
    from tests.integrations.hf_helpers import LIMIT, Watch, arguments, bert, flat, inject_oom

    args = arguments(tempfile.mkdtemp(prefix=f"hf-rank{rank}-"), PER_DEVICE, 4, ddp_backend="gloo")
    model, watch = bert(), Watch()
    trainer = AutoBatchTrainer(
        model=model, args=args, train_dataset=classification_samples(N), data_collator=padding_collator(),
        callbacks=[watch], memory_limit=LIMIT,
    )  # fmt: skip
    fired = inject_oom(trainer, step=1, rank=oom_rank)
    trainer.train()
    return {
        "weights": flat(model),
        "target": trainer.target_batch,
        "per_rank": trainer.per_rank,
        "probe": trainer.probe_result.micro_batch,
        "backoffs": [(b.step, b.from_micro, b.to_micro) for b in trainer.backoffs],
        "fired": fired["fired"],
        "global_step": trainer.state.global_step,
        "step_samples": watch.step_samples,
    }


def lightning(rank: int) -> dict[str, Any]:
    """Lightning's DDP on 2 ranks with AutoBatch: the module written for 16 a rank, 8 MiB."""
    os.environ.setdefault("TORCHELASTIC_RUN_ID", "autobatch-tests")  # Lightning reads torchrun's ranks
    import lightning.pytorch as pl

    from autobatch.integrations.lightning import AutoBatch
    from tests.hf_fixtures import classification_samples
    from tests.integrations.hf_helpers import LIMIT, flat
    from tests.integrations.pl_helpers import BertModule, StepSamples, trainer

    pl.seed_everything(0, verbose=False)
    module, counted = BertModule(classification_samples(N), 16), StepSamples()
    callback = AutoBatch(memory_limit=LIMIT)
    trainer([counted, callback], devices=2, strategy="ddp").fit(module)
    return {
        "weights": flat(module.model),
        "target": callback.target_batch,
        "probe": callback.probe_result.micro_batch,
        "micro": callback.micro_batch,
        "accumulate": callback.accumulate,
        "step_samples": counted.steps,
    }
