"""The integrations under DDP: two gloo ranks on the CPU with torchrun's environment, spawned once for
both frameworks (starting a rank costs seconds); the results are checked against single-process runs.

AutoBatchTrainer: the ranks agree on the micro-batch and on a back-off when one rank runs out of memory,
and end with the weights of the plain Trainer at one batch of 32 in one process. Lightning's AutoBatch:
the ranks probe alike, and every step of 2 × 16 ends with the weights of one batch of 32.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests import ddp_workers

HAS = {
    name: importlib.util.find_spec(name) is not None for name in ("transformers", "accelerate", "lightning")
}

pytestmark = [
    pytest.mark.skipif(not HAS["transformers"], reason="needs transformers (pip install -e '.[hf]')"),
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.timeout(240),
    pytest.mark.slow,
]
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Each scenario's result on rank 0 and rank 1."""
    names = []
    if HAS["accelerate"]:
        names.append("hf")
    if HAS["lightning"]:
        names.append("lightning")
    if not names:
        pytest.skip("needs accelerate or lightning")
    scenarios = [(f"tests.integrations.ranks:{name}", {}) for name in names]
    out = ddp_workers.launch(scenarios, tmp_path_factory.mktemp("ranks"), timeout=200.0)
    return {name: [out[rank]["results"][i] for rank in range(2)] for i, name in enumerate(names)}


def test_autobatch_trainer_ranks_agree_and_equal_one_batch_of_the_target(
    ranks: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    if "hf" not in ranks:
        pytest.skip("needs accelerate")
    from transformers import Trainer

    from tests.hf_fixtures import classification_samples, padding_collator
    from tests.integrations.hf_helpers import arguments, bert, flat, rel_err
    from tests.integrations.ranks import N

    zero, one = ranks["hf"]
    assert zero["target"] == one["target"] == 32 and zero["per_rank"] == 16
    assert zero["probe"] == one["probe"] < 16
    assert (zero["fired"], one["fired"]) == (0, 1)  # the out-of-memory was on rank 1 only
    assert zero["backoffs"] == one["backoffs"] and len(zero["backoffs"]) == 1  # both backed off, together
    assert zero["backoffs"][0][0] == 1  # in step 2, which was redone
    assert zero["global_step"] == one["global_step"] == 6
    assert zero["step_samples"][0] == one["step_samples"][0] == 16  # each rank's share of a clean step
    assert torch.equal(zero["weights"], one["weights"])
    model = bert()
    plain = arguments(tmp_path, 32, 1)
    Trainer(
        model=model, args=plain, train_dataset=classification_samples(N), data_collator=padding_collator()
    ).train()
    assert rel_err(zero["weights"], flat(model)) < TOLERANCE


def test_lightning_ranks_agree_and_equal_one_batch_of_the_target(
    ranks: dict[str, list[dict[str, Any]]],
) -> None:
    if "lightning" not in ranks:
        pytest.skip("needs lightning")
    from tests.hf_fixtures import classification_samples, padding_collator
    from tests.integrations.hf_helpers import bert, flat, rel_err
    from tests.integrations.ranks import N

    zero, one = ranks["lightning"]
    assert zero["target"] == 32 and zero["probe"] == one["probe"]  # agreed
    assert zero["micro"] * zero["accumulate"] == 16 and zero["micro"] == one["micro"]
    assert zero["step_samples"] == one["step_samples"] == [16] * 6  # each rank's half of every step
    assert torch.equal(zero["weights"], one["weights"])
    # Lightning's DistributedSampler (seed 0, shuffled per epoch) interleaves one permutation over the
    # ranks: a step of both ranks is 32 consecutive samples of it.
    samples, collate, model = classification_samples(N), padding_collator(), bert()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(2):
        order = torch.randperm(N, generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, N, 32):
            model(**collate([samples[i] for i in order[start : start + 32]])).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert rel_err(zero["weights"], flat(model)) < TOLERANCE
