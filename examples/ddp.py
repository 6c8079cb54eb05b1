"""Data-parallel training under torchrun: the ranks agree on one micro-batch, rank 0 reports.

Run on two CPU processes (gloo), or on two GPUs (NCCL) with no change:

    torchrun --nproc-per-node 2 examples/ddp.py

``autobatch.fit`` initialises the process group from torchrun's environment, wraps the model in
``DistributedDataParallel``, probes on every rank (all ranks take the micro-batch that fits on the
tightest one), gives each rank its share of every step's ``target_batch`` samples, and gathers the
evaluation predictions of all ranks before the classification report. Every rank gets the same
result; only rank 0 logs and prints. A model already wrapped in DDP, in a group you initialised
yourself, works the same way.
"""

import argparse

import torch
import torch.distributed as dist

import autobatch
from autobatch.demo import DEMO_MEMORY_LIMIT, DigitsCNN, load_digits_data

parser = argparse.ArgumentParser(description="autobatch.fit under torchrun")
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--target-batch", type=int, default=64, help="samples per optimizer step, all ranks")
parser.add_argument(
    "--memory-limit",
    default=None,
    help=f"memory per rank, e.g. 8GiB (default: the whole GPU, or an emulated {DEMO_MEMORY_LIMIT} CPU)",
)
args = parser.parse_args()

digits = load_digits_data()
torch.manual_seed(0)  # DDP copies rank 0's weights to the other ranks anyway
model = DigitsCNN()

result = autobatch.fit(
    model,
    digits.train,  # every rank passes the whole dataset; each trains on its share of every step
    target_batch=args.target_batch,  # over all ranks: must be divisible by the number of ranks
    epochs=args.epochs,
    eval_data=digits.test,
    target_names=digits.target_names,
    memory_limit=args.memory_limit or (None if torch.cuda.is_available() else DEMO_MEMORY_LIMIT),
    seed=0,  # the same epoch order on every rank
)

if not dist.is_initialized() or dist.get_rank() == 0:
    print(f"plan: {result.plan.describe()}")  # e.g. 11+11+10 × 2 ranks = 64
    if result.backoffs:
        print(f"out-of-memory back-offs: {len(result.backoffs)}; final plan {result.final_plan.describe()}")
    print(f"{result.samples} samples in {result.train_seconds:.1f} s")
    print(result.report.text if result.report else "no evaluation")

if dist.is_initialized():
    dist.destroy_process_group()
