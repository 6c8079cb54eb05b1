"""Two escape hatches: a Hugging Face-style model fed dict batches, and a custom ``step_fn``.

* Dict batches are passed as ``model(**batch)``; the output's ``.loss`` is trained on and its
  ``.logits`` are scored in evaluation.
* ``step_fn(model, batch) -> loss`` replaces forward and loss entirely, for any batch layout.

Run: ``python examples/custom_step.py``
"""

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

import autobatch


@dataclass
class Output:
    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyClassifier(nn.Module):
    """Takes ``features`` and optional ``labels`` keyword arguments, like a Hugging Face model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        logits = self.net(features)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return Output(loss=loss, logits=logits)


class DictDataset(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, 0] > 0).long() + (self.x[:, 1] > 1).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "labels": self.y[i]}


torch.manual_seed(0)
train, test = DictDataset(2048, seed=0), DictDataset(512, seed=1)

# 1. Dict batches: nothing to configure.
result = autobatch.fit(
    TinyClassifier(), train, target_batch=64, epochs=8, eval_data=test,
    memory_limit="40KiB", device="cpu", progress=False,
)  # fmt: skip
print("dict batches:", result.plan.describe(), f"accuracy {result.report.accuracy:.3f}")


# 2. A step_fn: any batch layout, any loss (here label smoothing on the dict batch).
def step_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["features"]).logits
    return nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.1)


result = autobatch.fit(
    TinyClassifier(), train, target_batch=64, epochs=8, step_fn=step_fn, eval_data=test,
    memory_limit="40KiB", device="cpu", progress=False,
)  # fmt: skip
print("step_fn:     ", result.plan.describe(), f"accuracy {result.report.accuracy:.3f}")
