"""Predicted vs measured on the CUDA card this runs on: what ``autobatch.predict`` says on the CPU, and what
``autobatch.probe`` finds on the card itself, for the same models (``benchmarks/gpu.sh`` runs it).

1. The card as CUDA reports it (total memory, compute capability, multiprocessors), and the two figures the
   card table estimates (``autobatch/memory/cards.py``), measured after a warm-up fp16 training step of a
   linear layer: the CUDA context outside the caching allocator (total - free - reserved) and the cuBLAS
   workspaces inside it (what ``memory_allocated()`` drops by when ``torch._C._cuda_clearCublasWorkspaces()``
   frees them), next to the table's.
2. Per model (the language models of ``benchmarks/predict.py``, built from configs): the prediction on the
   CPU for this card (the table's context estimate, then the measured context as ``memory_limit``), the
   probe's surviving micro-batch on the card (fp16, AdamW, no limit: the whole card), and the error in %.

Capped at ``--max-batch`` (512) so that a probe's batches and a prediction's replays stay small; models
left when ``--budget`` seconds (200) are spent are skipped and say so, and the table-estimate prediction is
made only while there is time. About 3 minutes on an H100 or H200.

Run from the repository root on a CUDA machine: ``python benchmarks/gpu_predict.py [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import autobatch  # noqa: E402
from autobatch.memory.cards import CARDS, Card, card, cublas_workspaces  # noqa: E402
from autobatch.units import format_bytes  # noqa: E402
from benchmarks.predict import build, lm_step  # noqa: E402

MODELS = ("bert-base", "gpt2-small", "lm-70M")


def table_card(props: Any) -> tuple[Card, str]:
    """The table's card for this device, or the table's largest of its compute capability (said so)."""
    sm = props.major * 10 + props.minor
    try:
        return card(props.name), "in the table"
    except ValueError:
        same = [c for c in CARDS.values() if c.sm == sm] or list(CARDS.values())
        nearest = max(same, key=lambda c: c.total)
        return nearest, f"not in the table: predicted with {nearest.name}'s kernels and this card's memory"


def measure_card() -> dict[str, Any]:
    """The card's figures and the context and workspaces measured after a warm-up training step."""
    props = torch.cuda.get_device_properties(0)
    sm = props.major * 10 + props.minor
    layer = torch.nn.Linear(1024, 1024, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = layer(torch.randn(64, 1024, device="cuda")).float().sum()
    loss.backward()  # the backward's matmuls run on autograd's device thread: a second cuBLAS handle
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    allocated = torch.cuda.memory_allocated()
    torch._C._cuda_clearCublasWorkspaces()
    workspaces = allocated - torch.cuda.memory_allocated()
    del layer, loss
    torch.cuda.empty_cache()
    known, where = table_card(props)
    return {
        "name": props.name,
        "table_card": known.name,
        "table": where,
        "total": int(total),
        "table_total": known.total,
        "sm": sm,
        "sms": props.multi_processor_count,
        "context": int(total - free - reserved),
        "table_context": known.context,
        "workspaces": int(workspaces),
        "table_workspaces": sum(cublas_workspaces(sm)),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
    }


def compare(name: str, facts: dict[str, Any], max_batch: int, deadline: float) -> dict[str, Any]:
    """Predict (with the measured context), probe on the card, then predict with the table's estimate
    where ``deadline`` (a ``perf_counter`` time) has not passed."""
    model, samples = build(name, n=4)
    data = [samples[i % len(samples)] for i in range(max_batch)]  # the same few samples: no host memory
    step = {"step_fn": lm_step} if name == "lm-70M" else {}
    gpu = facts["table_card"]
    row: dict[str, Any] = {"model": name}
    started = time.perf_counter()
    # This card as measured: its memory and context, the table card's capability (its kernels).
    here = Card(
        facts["name"],
        facts["total"],
        facts["sm"],
        facts["sms"],
        "measured here",
        context_bytes=facts["context"],
    )
    measured = autobatch.predict(model, data, gpu=here, max_batch=max_batch, **step)
    row["predict_s"] = round(time.perf_counter() - started, 1)
    row.update(predicted=measured.max_fitting_batch, notes=measured.prediction_notes)
    started = time.perf_counter()
    model = model.to("cuda")
    probed = autobatch.probe(
        model, data, device="cuda", precision="fp16", cache=False, max_batch=max_batch, **step
    )
    row["probe_s"] = round(time.perf_counter() - started, 1)
    free, total = torch.cuda.mem_get_info()  # the context grows as kernels load: after this model's steps
    row["context_after"] = int(total - free - torch.cuda.memory_reserved())
    row.update(
        probed=probed.max_fitting_batch,
        probe_steps=probed.optimizer_steps,
        probe_decided_by=probed.decided_by,
        capped=probed.capped_by is not None,
    )
    del model
    torch.cuda.empty_cache()
    if time.perf_counter() - deadline < 0:  # the table's context estimate too, while there is time
        model, _ = build(name, n=4)
        table = autobatch.predict(model, data, gpu=gpu, max_batch=max_batch, **step)
        row["predicted_table"] = table.max_fitting_batch
    for key in ("predicted_table", "predicted"):
        if key in row:
            row[f"{key}_error_pct"] = round(100 * (row[key] - row["probed"]) / row["probed"], 1)
    return row


def markdown(facts: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    f = facts
    lines = [
        f"card: {f['name']} ({f['table']}: {f['table_card']}), capability {f['sm'] // 10}.{f['sm'] % 10}, "
        f"{f['sms']} SMs, torch {f['torch']}, cuDNN {f['cudnn']}",
        "",
        "| figure | measured | card table |",
        "|---|---:|---:|",
        f"| total_memory | {format_bytes(f['total'])} | {format_bytes(f['table_total'])} |",
        f"| CUDA context (outside the allocator) | {format_bytes(f['context'])} | "
        f"{format_bytes(f['table_context'])} |",
        f"| cuBLAS workspaces (inside) | {format_bytes(f['workspaces'])} "
        f"| {format_bytes(f['table_workspaces'])} |",
        "",
        "| model | predicted (table) | predicted (measured context) | probed on the card | error (table) "
        "| error (measured context) | predict s | probe s | probe decided by | context after it |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | skipped: {r['skipped']} | | | | | | | | |")
            continue
        cap = " (cap)" if r["capped"] else ""
        table = f"{r['predicted_table_error_pct']:+.1f} %" if "predicted_table" in r else "–"
        lines.append(
            f"| {r['model']} | {r.get('predicted_table', '–')} | {r['predicted']} | {r['probed']}{cap} "
            f"| {table} | {r['predicted_error_pct']:+.1f} % "
            f"| {r['predict_s']} | {r['probe_s']} | {r['probe_decided_by']} "
            f"| {format_bytes(r['context_after'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--max-batch", type=int, default=512)
    parser.add_argument("--budget", type=float, default=200.0, help="seconds; later models are skipped")
    parser.add_argument("--json", help="also write the figures and rows to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device")
    started = time.perf_counter()
    facts = measure_card()
    print(json.dumps(facts), file=sys.stderr, flush=True)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        if time.perf_counter() - started > args.budget:
            rows.append({"model": name, "skipped": f"{args.budget:.0f} s spent"})
            continue
        try:
            rows.append(compare(name, facts, args.max_batch, started + args.budget))
        except ImportError as exc:  # transformers missing
            rows.append({"model": name, "skipped": str(exc)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(markdown(facts, rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"card": facts, "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
