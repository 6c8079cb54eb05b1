"""Quick start: train a CNN on scikit-learn's digits with an effective batch of 32 on a tiny device.

The device is emulated at 640 KiB, so the largest micro-batch that fits is below 32 and autobatch
accumulates gradients to reach 32 exactly. On a GPU, drop ``memory_limit`` and ``device``: autobatch
probes the real device.

Run: ``python examples/quickstart.py``
"""

import torch
from rich.console import Console

import autobatch
from autobatch.demo import DigitsCNN, load_digits_data

digits = load_digits_data()
torch.manual_seed(0)
model = DigitsCNN()

result = autobatch.fit(
    model,
    digits.train,  # tensors (X, y); a Dataset or DataLoader works too
    target_batch=32,
    epochs=4,
    eval_data=digits.test,
    target_names=digits.target_names,
    memory_limit="640KiB",  # an emulated small device; omit on a real GPU
    device="cpu",
    seed=0,
)

console = Console()
console.print(result.probe)  # the probe's trials as a table
console.print(f"plan: {result.plan.describe()}")  # e.g. 11+11+10 × 1 rank = 32
console.print(result)
console.print(result.report.text if result.report else "no evaluation")
