"""Token-level loss with ``num_items``: exact gradients when micro-batches hold different token counts.

A sequence-labelling model is trained on padded sequences of varying length; padding labels are -100
and the loss is a mean over real tokens. Weighting micro-batches by samples would make a micro-batch
of short sequences weigh as much as one of long ones; ``num_items`` counts the real tokens, so every
token weighs the same, exactly as in one big batch.

Run: ``python examples/token_level.py``
"""

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

import autobatch

VOCAB, TAGS = 50, 5


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32, padding_idx=0)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, TAGS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])  # [B, T, TAGS]


class Sequences(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 40, (n,), generator=g)
        self.tokens = [torch.randint(1, VOCAB, (int(n_),), generator=g) for n_ in lengths]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokens[i]
        return tokens, tokens % TAGS  # the tag is a function of the token: learnable


def collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = pad_sequence([t for t, _ in samples], batch_first=True, padding_value=0)
    tags = pad_sequence([y for _, y in samples], batch_first=True, padding_value=-100)
    return tokens, tags


def token_loss(logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, TAGS), tags.reshape(-1), ignore_index=-100)


def real_tokens(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return (batch[1] != -100).sum()


torch.manual_seed(0)
train = DataLoader(Sequences(1024, seed=0), batch_size=8, shuffle=True, collate_fn=collate)
test = DataLoader(Sequences(256, seed=1), collate_fn=collate)

result = autobatch.fit(
    Tagger(),
    train,  # the DataLoader's dataset, collate_fn and shuffling are kept; its batch size is not
    target_batch=64,
    epochs=10,
    loss_fn=token_loss,
    num_items=real_tokens,
    eval_data=test,
    memory_limit="1MiB",
    device="cpu",
    progress=False,
)
print(result.plan.describe(), f"token accuracy {result.report.accuracy:.3f}")
