"""Tests for autobatch.distributed: two gloo ranks on the CPU, as torchrun starts them.

One launch of two spawned ranks runs every scenario in order (starting a rank costs seconds); the tests
then check its results against single-process runs of :func:`autobatch.fit` and :func:`autobatch.probe`
made here, in the test process. The ranks start with torchrun's environment and no process group, so
the first autobatch call initialises it; a later scenario replaces it with a group the "user"
initialised, and wraps the model in DDP itself. A deadlock fails the launch after 120 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

import autobatch
from autobatch.result import Backoff
from tests import ddp_workers as w

pytestmark = [
    pytest.mark.skipif(
        not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
    ),
    pytest.mark.timeout(180),
    pytest.mark.slow,
]

ROOT = Path(__file__).resolve().parents[1]
LIMITS = ["96KiB", "64KiB"]  # rank 0, rank 1: alone, the MLP's probe gives 98 and 60
N, EVAL_N = 100, 37  # 100 = 32 + 32 + 32 + 4: the last step gives each rank 2 samples
TRAINSTEP = {"n": N, "per_rank": 16, "seed": 4}  # the user's loaders: batches of 16 a rank, shuffled


def scenarios(user_port: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """What the ranks run, in order: ``name: (scenario, options)``."""
    return {
        # The group does not exist yet: the probe initialises it from torchrun's environment.
        "probe": ("probe_own_limit", {"limits": LIMITS, "n": 512}),
        "probe_again": ("probe_own_limit", {"limits": ["96KiB", "48KiB"], "n": 512}),
        "ordered": (  # per rank 16 = 6+5+5: uneven micro-batches
            "fit_tensors",
            {"n": N, "eval_n": EVAL_N, "target_batch": 32, "micro_batch": 6, "shuffle": False},
        ),
        "shuffled": (
            "fit_indexed",
            {"n": N, "target_batch": 32, "micro_batch": 6, "shuffle": True, "seed": 7, "epochs": 2},
        ),
        "one_sample_last": ("fit_indexed", {"n": 65, "target_batch": 32, "micro_batch": 5, "shuffle": False}),
        "unseeded": (  # no seed, and each rank's torch generator in another state
            "fit_indexed",
            {"n": N, "target_batch": 32, "micro_batch": 6, "shuffle": True, "rng_per_rank": True},
        ),
        "token_weighted": (
            "fit_indexed",
            {"n": N, "target_batch": 32, "micro_batch": 6, "shuffle": False, "weighted": True},
        ),
        "batchnorm": (
            "fit_tensors",
            {"n": N, "model": "mlp_bn", "target_batch": 32, "micro_batch": 6, "shuffle": False},
        ),
        # Rank 1's 4th micro-step (the second of step 2) runs out of memory.
        "oom": (
            "fit_oom_on_rank",
            {"oom_rank": 1, "oom_call": 4, "n": 96, "target_batch": 32, "micro_batch": 8, "shuffle": False},
        ),
        "indivisible": ("fit_error", {"n": N, "target_batch": 33, "micro_batch": 6}),
        # optimizer.step runs out of memory once on rank 1 (3 epochs, with evaluation: the repro).
        "optimizer_oom_subclass": (
            "fit_optimizer_oom",
            {"oom_rank": 1, "kind": "subclass", "n": 96, "target_batch": 32, "micro_batch": 8, "epochs": 3},
        ),
        "optimizer_oom_clean": (
            "fit_optimizer_oom",
            {"oom_rank": 1, "kind": "clean", "n": 96, "target_batch": 32, "micro_batch": 8, "epochs": 3},
        ),
        "optimizer_oom_partial": (
            "fit_optimizer_oom",
            {"oom_rank": 1, "kind": "partial", "n": 96, "target_batch": 32, "micro_batch": 8, "epochs": 3},
        ),
        # Something other than memory fails on rank 1 only.
        "error_forward": (
            "fit_error_on_rank",
            {"where": "forward", "n": 96, "target_batch": 32, "micro_batch": 8},
        ),
        "error_data": (
            "fit_error_on_rank",
            {"where": "data", "n": 96, "target_batch": 32, "micro_batch": 8, "shuffle": False},
        ),
        "error_eval": ("fit_error_on_rank", {"where": "eval", "n": 64, "target_batch": 32, "micro_batch": 8}),
        "lengths": ("fit_lengths", {"lengths": [96, 97], "target_batch": 32, "micro_batch": 8}),
        # Reading a sample of rank 1's share runs out of memory (host-side): once, or every time.
        "data_oom_once": (
            "fit_flaky_data",
            {"failures": 1, "n": 96, "target_batch": 32, "micro_batch": 8, "shuffle": False},
        ),
        "data_oom_always": (
            "fit_flaky_data",
            {"failures": 100, "n": 96, "target_batch": 32, "micro_batch": 8, "shuffle": False},
        ),
        # BatchNorm: a last step of 3 samples (35 = 32 + 3) at micro-batch 2, and a lone last sample (65).
        "bn_three": (
            "fit_batchnorm_sizes",
            {"n": 35, "target_batch": 32, "micro_batch": 2, "shuffle": False},
        ),
        "bn_lone": ("fit_batchnorm_sizes", {"n": 65, "target_batch": 32, "micro_batch": 6, "shuffle": False}),
        "user_init": ("init_group_as_user", {"port": user_port}),
        "user_ddp": (
            "fit_user_ddp",
            {"n": N, "target_batch": 32, "micro_batch": 6, "seed": 3, "grad_clip": 0.1},
        ),
        "user_ddp_probed": ("fit_user_ddp", {"n": N, "target_batch": 32, "memory_limit": "20KiB", "seed": 3}),
        # The user's own loop: TrainStep on each rank's share (16) of each global batch of 32.
        # A plain module, probed on the first call; rank 1 starts from other weights (rank 0's are copied).
        "trainstep_plain": (
            "trainstep_loop",
            {**TRAINSTEP, "wrap": "plain", "init_seeds": (0, 1), "memory_limit": "20KiB"},
        ),
        "trainstep_ddp": ("trainstep_loop", {**TRAINSTEP, "wrap": "ddp", "micro_batch": 6, "grad_clip": 0.1}),
        # Rank 1's 5th micro-step (the second of step 2, 6+5+5 a step) runs out of memory.
        "trainstep_oom": ("trainstep_loop", {**TRAINSTEP, "micro_batch": 6, "oom_rank": 1, "oom_call": 5}),
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Each rank's ``{"results": {name: dict}, "logs": [records of autobatch's loggers]}``."""
    runs = scenarios(w.free_port())
    try:
        out = w.launch(list(runs.values()), tmp_path_factory.mktemp("ddp"), timeout=120)
    except w.LaunchError as exc:  # a deadlock or a failed rank fails the tests, with the ranks' tracebacks
        pytest.fail(str(exc), pytrace=False)
    return [{**rank, "results": dict(zip(runs, rank["results"], strict=True))} for rank in out]


def results(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [rank["results"][name] for rank in ranks]


def reference(
    data: Any, model: Any = None, optimizer: Any = None, **options: Any
) -> tuple[autobatch.FitResult, dict[str, torch.Tensor]]:
    """Single-process ``fit`` of the same model, from the same initial weights."""
    model = model if model is not None else w.mlp()
    optimizer = optimizer if optimizer is not None else w.sgd(model)
    result = autobatch.fit(model, data, optimizer=optimizer, **w.fit_options(**options))
    return result, w.weights(model)


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def single_probe(limit: str) -> int:
    model = w.mlp()
    return autobatch.probe(
        model, w.vectors(512), optimizer=w.sgd(model), precision="fp32", memory_limit=limit, device="cpu"
    ).micro_batch


# -- probe -----------------------------------------------------------------------------------------
def test_ranks_with_different_limits_agree_on_the_smaller_micro_batch(ranks: list[dict[str, Any]]) -> None:
    alone = {limit: single_probe(limit) for limit in LIMITS}
    assert alone["96KiB"] > alone["64KiB"]  # the limits do make a difference
    assert [r["micro_batch"] for r in results(ranks, "probe")] == [alone["64KiB"]] * 2


def test_probe_cache_is_not_reused_when_another_ranks_limit_shrank(ranks: list[dict[str, Any]]) -> None:
    # Same setup and rank-0 limit as "probe", but rank 1 now has 48 KiB.
    assert [r["micro_batch"] for r in results(ranks, "probe_again")] == [single_probe("48KiB")] * 2


# -- training equals one process -------------------------------------------------------------------
def test_weights_equal_single_process_training(ranks: list[dict[str, Any]]) -> None:
    single, expected = reference(w.vectors(N), target_batch=32, micro_batch=6, shuffle=False)
    for rank in results(ranks, "ordered"):
        assert rank["plan"]["chunk_sizes"] == [[6, 1], [5, 2]]
        assert (rank["steps"], rank["samples"], rank["backoffs"]) == (4, N, [])
        assert_same_weights(rank["weights"], expected)
        # Each step's loss is the loss over both ranks' samples, the same on every rank.
        assert rank["losses"] == pytest.approx(single.losses, rel=1e-5)
    first, second = results(ranks, "ordered")
    assert first["losses"] == second["losses"]


def test_shuffled_epochs_equal_single_process_training(ranks: list[dict[str, Any]]) -> None:
    seen: list[int] = []
    options = {"target_batch": 32, "micro_batch": 6, "shuffle": True, "seed": 7, "epochs": 2}
    _, expected = reference(w.Indexed(N), step_fn=w.record_ids(seen), **options)
    for rank in results(ranks, "shuffled"):
        assert_same_weights(rank["weights"], expected)
    # Each step's samples are those of the single process's step, cut into one share per rank.
    first, second = (r["seen"] for r in results(ranks, "shuffled"))
    shares = [16, 16, 16, 2] * 2  # per rank and step: 100 = 3 × 32 + 4, two epochs
    merged, a, b = [], 0, 0
    for share in shares:
        merged += first[a : a + share] + second[b : b + share]
        a, b = a + share, b + share
    assert (a, b) == (len(first), len(second))
    assert merged == seen


def test_every_sample_is_seen_once_per_epoch_across_ranks(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["seen"] for r in results(ranks, "shuffled"))
    assert len(first) == len(second) == N  # 50 a rank and epoch
    epochs = [first[:50] + second[:50], first[50:] + second[50:]]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N))
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    assert first[:50] != list(range(50))  # shuffled


def test_a_rank_with_no_sample_in_the_last_step(ranks: list[dict[str, Any]]) -> None:
    first, second = results(ranks, "one_sample_last")
    # 65 = 32 + 32 + 1: rank 1 gets nothing in the last step but still takes part in it.
    assert first["seen"] == [*range(16), *range(32, 48), 64]
    assert second["seen"] == [*range(16, 32), *range(48, 64)]
    _, expected = reference(
        w.Indexed(65), step_fn=w.record_ids([]), target_batch=32, micro_batch=5, shuffle=False
    )
    for rank in (first, second):
        assert (rank["steps"], rank["samples"]) == (3, 65)
        assert_same_weights(rank["weights"], expected)


def test_unseeded_ranks_share_one_epoch_order(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["seen"] for r in results(ranks, "unseeded"))
    assert sorted(first + second) == list(range(N))
    assert first != sorted(first)  # shuffled
    weights = [r["weights"] for r in results(ranks, "unseeded")]
    assert_same_weights(weights[0], weights[1])


def test_micro_losses_weighted_by_items_across_ranks(ranks: list[dict[str, Any]]) -> None:
    # Each rank's items differ (sample i counts i % 3 + 1): weights must be shares of the global count.
    step_fn = w.record_ids([], weighted=True)
    single, expected = reference(
        w.Indexed(N), step_fn=step_fn, num_items=w.items, target_batch=32, micro_batch=6, shuffle=False
    )
    for rank in results(ranks, "token_weighted"):
        assert_same_weights(rank["weights"], expected)
        assert rank["losses"] == pytest.approx(single.losses, rel=1e-5)


def test_batchnorm_buffers_are_rank_0s_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = (r["weights"] for r in results(ranks, "batchnorm"))
    assert first["1.num_batches_tracked"] > 0
    assert not torch.equal(first["1.running_mean"], torch.zeros(64))
    for name in first:  # parameters from the same summed gradients, buffers broadcast from rank 0
        assert torch.equal(first[name], second[name]), name


# -- out of memory on one rank ---------------------------------------------------------------------
def test_oom_on_one_rank_backs_off_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = results(ranks, "oom")
    _, expected = reference(w.vectors(96), target_batch=32, micro_batch=8, shuffle=False)
    for rank in (first, second):
        assert rank["backoffs"] == [Backoff(epoch=0, step=1, from_micro=8, to_micro=4)]
        assert rank["final_plan"]["chunk_sizes"] == [[4, 4]]
        assert (rank["steps"], rank["samples"]) == (3, 96)
        # 2 micro-steps in step 1, 2 in the failed try of step 2, then 4 + 4 at micro-batch 4.
        assert rank["backward_calls"] == 12
        assert_same_weights(rank["weights"], expected)
    assert first["final_plan"] == second["final_plan"]
    assert first["losses"] == second["losses"]


def test_optimizer_oom_in_a_step_autobatch_cannot_see_into_stops_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    assert [r["injected"] for r in results(ranks, "optimizer_oom_subclass")] == [False, True]
    for rank in results(ranks, "optimizer_oom_subclass"):
        assert rank["error"] == "OptimizerStepError" and rank["partial"] is True, rank
        assert "Out of memory inside optimizer.step() of step 1 on rank(s) [1]" in rank["message"]
        assert "can be neither undone nor repeated" in rank["message"]


def test_optimizer_oom_before_anything_changed_is_tried_again_on_that_rank(
    ranks: list[dict[str, Any]],
) -> None:
    first, second = results(ranks, "optimizer_oom_clean")
    assert (first["injected"], second["injected"]) == (False, True)
    assert first["error"] is None and second["error"] is None
    assert first["backoffs"] == second["backoffs"] == []
    assert (first["steps"], first["samples"]) == (9, 3 * 96)
    model = w.mlp()
    _, expected = reference(
        w.vectors(96), optimizer=torch.optim.Adam(model.parameters(), lr=1e-2), model=model, target_batch=32,
        micro_batch=8, epochs=3, eval_data=w.vectors(37, seed=1),
    )  # fmt: skip
    for rank in (first, second):
        assert_same_weights(rank["weights"], expected)  # the retried update is the update, once
    assert first["losses"] == second["losses"]


def test_optimizer_oom_after_a_partial_update_stops_every_rank(ranks: list[dict[str, Any]]) -> None:
    first, second = results(ranks, "optimizer_oom_partial")
    assert (first["injected"], second["injected"]) == (False, True)
    for rank in (first, second):
        assert rank["error"] == "OptimizerStepError" and rank["partial"] is True
        assert "step 1 on rank(s) [1]" in rank["message"]
    # Never applied twice: rank 1's first parameter moved once, the others not at all; rank 0 stepped once.
    model = w.mlp()
    before = w.weights(model)
    assert not torch.equal(second["after_weights"]["0.weight"], before["0.weight"])
    assert torch.equal(second["after_weights"]["2.weight"], before["2.weight"])


@pytest.mark.parametrize(("name", "own_error"), [("error_forward", "ValueError"), ("error_data", "KeyError")])
def test_an_error_on_one_rank_stops_every_rank(
    ranks: list[dict[str, Any]], name: str, own_error: str
) -> None:
    first, second = results(ranks, name)
    assert second["error"] == own_error  # the failing rank raises its own error
    assert first["error"] == "PeerError" and first["ranks"] == [1]  # the other one says which rank failed
    assert own_error in first["message"]


def test_an_evaluation_error_on_one_rank_gives_every_rank_the_trained_result(
    ranks: list[dict[str, Any]],
) -> None:
    first, second = results(ranks, "error_eval")
    assert first["error"] == second["error"] == "EvaluationError"
    assert second["cause"] == "RuntimeError"  # the failing rank's own error, as __cause__
    assert first["cause"] == "PeerError" and first["cause_ranks"] == [1]
    for rank in (first, second):
        assert "RuntimeError" in rank["message"] and "after epoch 1 failed" in rank["message"]
        assert rank["trained"]["epochs"] == 1 and rank["trained"]["steps"] == 2  # 64 samples, 32 a step


def test_a_read_that_runs_out_of_memory_once_on_one_rank_is_retried_there(
    ranks: list[dict[str, Any]],
) -> None:
    _, expected = reference(
        w.Indexed(96), step_fn=w.record_ids([]), target_batch=32, micro_batch=8, shuffle=False
    )
    first, second = results(ranks, "data_oom_once")
    for rank in (first, second):
        assert rank["error"] is None and rank["backoffs"] == []  # host memory: no back-off
        assert (rank["steps"], rank["samples"]) == (3, 96)
        assert_same_weights(rank["weights"], expected)
    assert sorted(first["seen"] + second["seen"]) == list(range(96))  # every sample once


def test_a_read_that_keeps_failing_on_one_rank_stops_every_rank_with_the_right_errors(
    ranks: list[dict[str, Any]],
) -> None:
    first, second = results(ranks, "data_oom_always")
    assert second["error"] == "OutOfMemoryError"  # the failing rank: the user's own error, not a back-off
    (note,) = second["notes"]
    assert "epoch 1, step 2, rank 1" in note and f"reading samples {list(range(48, 64))}" in note
    assert first["error"] == "PeerError" and first["ranks"] == [1]
    assert "Rank 1 failed preparing the micro-batches of step 2 (epoch 1)" in first["message"]
    assert "OutOfMemoryError: injected: reading sample 50" in first["message"]


def test_ranks_with_datasets_of_different_lengths_are_refused_on_every_rank(
    ranks: list[dict[str, Any]],
) -> None:
    for rank in results(ranks, "lengths"):
        assert rank["error"] == "UsageValueError"
        assert "same dataset length (`data`), but got rank 0: 96, rank 1: 97" in rank["message"]


def test_batchnorm_ranks_never_train_on_one_sample(ranks: list[dict[str, Any]]) -> None:
    first, second = results(ranks, "bn_three")
    # Step 1: 16 a rank at micro 2. Step 2: 3 samples, all on rank 0 as one chunk (2 + 1 would crash).
    assert first["sizes"] == [2] * 8 + [3] and second["sizes"] == [2] * 8
    first, second = results(ranks, "bn_lone")
    # 65 = 32 + 33: the lone last sample joins step 2, shared 17 + 16 (6+6+5 and 6+5+5).
    assert first["sizes"] == [6, 5, 5, 6, 6, 5] and second["sizes"] == [6, 5, 5, 6, 5, 5]
    assert first["samples"] == second["samples"] == 65
    for name in first["weights"]:
        assert torch.equal(first["weights"][name], second["weights"][name]), name


def test_backoff_warning_shows_the_plan_of_every_rank(ranks: list[dict[str, Any]]) -> None:
    (warning,) = [m for m in ranks[0]["logs"] if "out of memory at micro-batch 8" in m]
    assert warning.endswith("plan 4 × 4 steps × 2 ranks = 32"), warning


# -- arguments, evaluation, logs -------------------------------------------------------------------
def test_indivisible_target_names_the_nearest_valid_targets(ranks: list[dict[str, Any]]) -> None:
    for rank in results(ranks, "indivisible"):
        assert rank["error"] == "UsageValueError"
        assert "32 or 34" in rank["message"]


def test_evaluation_gathers_predictions_from_every_rank(ranks: list[dict[str, Any]]) -> None:
    single, _ = reference(
        w.vectors(N), target_batch=32, micro_batch=6, shuffle=False, eval_data=w.vectors(EVAL_N, seed=1)
    )
    assert single.report is not None
    first, second = (r["report"] for r in results(ranks, "ordered"))
    for report in (first, second):
        assert report["samples"] == EVAL_N  # not EVAL_N / 2: every rank's predictions were gathered
        assert report["accuracy"] == single.report.accuracy
        assert report["report"] == single.report.report
    assert first == second


def test_logs_only_on_rank_0(ranks: list[dict[str, Any]]) -> None:
    main, other = (rank["logs"] for rank in ranks)
    for expected in (
        "probe: micro-batch",
        "plan: 6+5+5 × 2 ranks = 32",
        "epoch 1: classification evaluation, accuracy",
        "out of memory",
    ):
        assert any(expected in message for message in main), expected
    # The group's initialisation is the test below.
    assert [m for m in other if "process group" not in m] == []


def test_group_initialisation_is_logged_on_rank_0_only(ranks: list[dict[str, Any]]) -> None:
    main, other = (rank["logs"] for rank in ranks)
    assert sum("initialised a gloo process group of 2 ranks" in m for m in main) == 1
    assert other == []


# -- a group and a DDP wrapper made by the user ----------------------------------------------------
def test_user_initialised_group_and_ddp_model(ranks: list[dict[str, Any]]) -> None:
    assert [r["backend"] for r in results(ranks, "user_init")] == ["gloo", "gloo"]
    # Clipping the gradient norm after the gradients were summed: the global norm, as one process.
    _, expected = reference(w.vectors(N), target_batch=32, micro_batch=6, seed=3, grad_clip=0.1)
    _, unclipped = reference(w.vectors(N), target_batch=32, micro_batch=6, seed=3)
    assert not torch.allclose(expected["0.weight"], unclipped["0.weight"])  # the clip did clip
    for rank in results(ranks, "user_ddp"):
        assert rank["still_ddp"]
        assert rank["plan"]["world_size"] == 2
        assert_same_weights(rank["weights"], expected)


def test_user_ddp_model_is_probed_and_trained_without_oom(ranks: list[dict[str, Any]]) -> None:
    first, second = results(ranks, "user_ddp_probed")
    assert first["micro_batch"] == second["micro_batch"] < 16  # the probe was the limit, not the cap
    assert first["backoffs"] == second["backoffs"] == []  # training fits where the probe said it would
    _, expected = reference(w.vectors(N), target_batch=32, micro_batch=first["micro_batch"], seed=3)
    for rank in (first, second):
        assert_same_weights(rank["weights"], expected)


# -- TrainStep in the user's own loop --------------------------------------------------------------
def full_batch_loop(grad_clip: float | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, one plain fp32 step per global batch (both ranks' batches together): the losses and
    the weights after the epoch."""
    model = w.mlp()
    optimizer = w.sgd(model)
    loaders = [
        w.rank_loader(rank, TRAINSTEP["n"], TRAINSTEP["per_rank"], TRAINSTEP["seed"]) for rank in (0, 1)
    ]
    losses = []
    for (x0, y0), (x1, y1) in zip(*loaders, strict=True):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(torch.cat([x0, x1])), torch.cat([y0, y1]))
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, w.weights(model)


def assert_trainstep_equals_one_process(ranks: list[dict[str, Any]], name: str, **reference: Any) -> None:
    losses, expected = full_batch_loop(**reference)
    first, second = results(ranks, name)
    for rank in (first, second):
        assert rank["steps"] == 4 and all(rank["applied"])
        assert [sum(m) for m in rank["micro_batches"]] == [16, 16, 16, 2]  # each rank's share, the last short
        assert_same_weights(rank["weights"], expected)
        # Each step's loss is over both ranks' samples, the same on every rank.
        assert rank["losses"] == pytest.approx(losses, rel=1e-5)
    assert first["losses"] == second["losses"]


def test_trainstep_on_a_plain_module_equals_one_process(ranks: list[dict[str, Any]]) -> None:
    assert_trainstep_equals_one_process(ranks, "trainstep_plain")
    first, second = results(ranks, "trainstep_plain")
    # Probed on the first call: 16 samples a rank do not fit in one micro-batch under 20 KiB.
    assert first["probed"] == second["probed"] < 16
    assert first["micro_batches"][0] == second["micro_batches"][0] and len(first["micro_batches"][0]) > 1
    assert first["all_backoffs"] == second["all_backoffs"] == []
    assert not first["still_ddp"]


def test_trainstep_on_the_users_ddp_equals_one_process(ranks: list[dict[str, Any]]) -> None:
    # Clipping the gradient norm after the gradients were summed: the global norm, as one process.
    assert_trainstep_equals_one_process(ranks, "trainstep_ddp", grad_clip=0.1)
    _, unclipped = full_batch_loop()
    _, clipped = full_batch_loop(grad_clip=0.1)
    assert not torch.allclose(unclipped["0.weight"], clipped["0.weight"])  # the clip did clip
    for rank in results(ranks, "trainstep_ddp"):
        assert rank["still_ddp"] and rank["probed"] is None
        assert rank["micro_batches"] == [(6, 5, 5)] * 3 + [(2,)]


def test_trainstep_oom_on_one_rank_backs_off_every_rank(ranks: list[dict[str, Any]]) -> None:
    assert_trainstep_equals_one_process(ranks, "trainstep_oom")
    first, second = results(ranks, "trainstep_oom")
    # Rank 1 halves (nothing measures it without a limit), rank 0 would take 5: both take the smaller.
    backoff = Backoff(epoch=0, step=1, from_micro=6, to_micro=3)
    for rank in (first, second):
        assert rank["backoffs"] == [[], [backoff], [], []]  # reported by the step that was redone
        assert rank["all_backoffs"] == [backoff]
        assert rank["micro_batches"] == [(6, 5, 5), (3, 3, 3, 3, 2, 2), (3, 3, 3, 3, 2, 2), (2,)]


# -- the example, under torchrun -------------------------------------------------------------------
def test_example_runs_under_torchrun(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(w.free_port()),
        str(ROOT / "examples" / "ddp.py"),
        "--epochs", "1", "--target-batch", "64", "--memory-limit", "640KiB",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AUTOBATCH_CACHE_DIR": str(tmp_path / "cache")}
    # A session of its own, so that a hung run's workers are killed with torchrun.
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("deadlock? examples/ddp.py did not finish under torchrun in 150 s")
    assert proc.returncode == 0, stderr[-4000:]
    # Printed by rank 0 only, once.
    assert stdout.count("plan: ") == 1
    assert "× 2 ranks = 64" in stdout
    assert stdout.count("macro avg") == 1
    assert stdout.count("1347 samples in") == 1  # the whole training split, counted over both ranks
