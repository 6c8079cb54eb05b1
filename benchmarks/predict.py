"""Predictions for cards this machine does not have: model × card, the predicted micro-batch, its cost.

For each model and card, one ``autobatch.predict(model, data, gpu=CARD)`` in a process of its own: the
predicted micro-batch and what decides it, the attention kernel CUDA would pick, the seconds the call took,
the process's wall time (interpreter, imports and the model's construction included), and the host memory
the prediction added: the peak resident set during the call (``VmHWM`` after ``/proc/self/clear_refs``)
less the resident set before it (the model's own weights excluded). The models are built from configs,
nothing downloaded: a 67M-parameter MLP and a 70M-parameter transformer LM for 80 GB cards, BERT-base
(masked LM, 512 tokens) and GPT-2 small (causal LM, 1024 tokens) for a T4 and an A100. fp16 with a
GradScaler (CUDA's ``precision="auto"``), AdamW (``foreach``, as CUDA's default).

Targets (issue 21): a ~70M model for an 80 GiB card in at most 30 s with at most 1.5 GiB of extra host
memory; BERT-base and GPT-2 small for a T4 and an A100 in at most 60 s each, on two CPU cores.

Run from the repository root: ``python benchmarks/predict.py [--quick] [--json]`` (about 3 minutes);
BERT and GPT-2 need ``pip install -e '.[hf]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = [
    ("mlp-67M", "A100-80GB"),
    ("lm-70M", "H100-80GB"),
    ("bert-base", "T4"),
    ("bert-base", "A100-80GB"),
    ("gpt2-small", "T4"),
    ("gpt2-small", "A100-80GB"),
]
QUICK = [("mlp-67M", "A100-80GB"), ("bert-base", "T4")]


def tiny_lm() -> Any:
    """A 12-layer pre-norm transformer LM of ``nn`` modules: 69.9M parameters at width 640, 512 tokens."""
    import torch
    from torch import nn

    class TinyLM(nn.Module):
        def __init__(self, vocab: int = 8192, width: int = 640, layers: int = 12, seq: int = 512) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.pos = nn.Parameter(torch.zeros(seq, width))
            layer = nn.TransformerEncoderLayer(width, 10, 4 * width, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(width, vocab)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.encoder(self.embed(ids) + self.pos[: ids.shape[1]])).flatten(0, 1)

    return TinyLM()


def lm_step(model: Any, batch: Any) -> Any:
    """The language model's loss: the next token... here the token itself (memory is what is measured)."""
    import torch.nn.functional as F

    return F.cross_entropy(model(batch["ids"]), batch["ids"].flatten())


def build(name: str, n: int = 4) -> tuple[Any, Any]:
    """The model and ``n`` samples of its largest size (token ids for the language models)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    if name == "mlp-67M":
        layers = [m for _ in range(4) for m in (nn.Linear(4096, 4096), nn.ReLU())]
        return nn.Sequential(*layers, nn.Linear(4096, 10)), (
            torch.randn(n, 4096, generator=g),
            torch.randint(0, 10, (n,), generator=g),
        )
    if name == "lm-70M":
        ids = torch.randint(0, 8192, (n, 512), generator=g)
        return tiny_lm(), [{"ids": ids[i]} for i in range(n)]
    import transformers

    transformers.logging.set_verbosity_error()
    if name == "bert-base":
        config = transformers.BertConfig(attn_implementation="sdpa")
        model = transformers.BertForMaskedLM(config)
        length, vocab = config.max_position_embeddings, config.vocab_size
    else:
        config = transformers.GPT2Config(attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(config)
        length, vocab = config.n_positions, config.vocab_size
    ids = torch.randint(5, vocab, (n, length), generator=g)
    mask = torch.ones(length, dtype=torch.long)
    return model, [{"input_ids": ids[i], "attention_mask": mask, "labels": ids[i]} for i in range(n)]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) << 10
    raise KeyError(key)


def one(name: str, card: str) -> dict[str, Any]:
    """One prediction, measured (run in a fresh process)."""
    import torch

    import autobatch

    torch.set_num_threads(2)
    model, data = build(name)
    step = {"step_fn": lm_step} if name == "lm-70M" else {}
    params = sum(p.numel() for p in model.parameters())
    warm = torch.nn.Linear(8, 2)  # the fake machinery's first use imports sympy: not the prediction's
    autobatch.predict(warm, (torch.randn(4, 8), torch.randint(0, 2, (4,))), gpu=card, max_batch=4)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM restarts from VmRSS
    started = time.perf_counter()
    result = autobatch.predict(model, data, gpu=card, **step)
    seconds = time.perf_counter() - started
    attention = next((n.split("attention: ")[-1] for n in result.prediction_notes if "attention:" in n), "–")
    return {
        "model": name,
        "params": params,
        "card": card,
        "micro_batch": result.micro_batch,
        "capped": result.capped_by is not None,
        "decided_by": result.decided_by,
        "attention": attention,
        "budget": result.budget_bytes,
        "seconds": round(seconds, 1),
        "extra_mib": (_status("VmHWM") - before) >> 20,
        "rss_before_mib": before >> 20,
        "notes": result.prediction_notes,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | params | card | predicted micro-batch | decided by | attention | predict s | wall s "
        "| extra host MiB | RSS before MiB |",
        "|---|---:|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        micro = f"{r['micro_batch']:,}" + (" (cap)" if r["capped"] else "")
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['card']} | {micro} | {r['decided_by']} "
            f"| {r['attention']} | {r['seconds']} | {r['wall']} | {r['extra_mib']} | {r['rss_before_mib']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="two rows only")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CARD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name, card in QUICK if args.quick else ROWS:
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--one", name, card],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            print(f"{name} on {card}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall"] = round(time.perf_counter() - started, 1)
        rows.append(row)
        print(f"{name} on {card}: {row['micro_batch']} in {row['seconds']} s", file=sys.stderr)
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
