"""What holds the centralized SST-2 ceiling down? Two probes outside the federated harness (docs/results.md).

    .venv/bin/python benchmarks/sst2_ceiling_probes.py probe [--task cola]     # linear probes, ~1 min
    .venv/bin/python benchmarks/sst2_ceiling_probes.py finetune mean 192 2e-3   # the sweep's budget
    .venv/bin/python benchmarks/sst2_ceiling_probes.py finetune cls 1200 1e-3 --all --batch 32 --decay

``probe``: frozen all-MiniLM-L6-v2 features of 6,000 training sentences (SST-2, or CoLA) (``[CLS]``, BERT's pooler, the
masked mean of the last layer), a logistic regression on each, accuracy (and MCC) on the whole dev set. ``finetune``:
LoRA rank 8 (PEFT) on query and value (``--all``: every attention and MLP projection) with a linear head on
the pooler output (``cls``) or the masked mean (``mean``), AdamW, batch 16 (``--batch``), a constant rate or
warmup then linear decay (``--decay``), dev accuracy 8 times along the way. One thread, seed 0.
Data: ``FEDLORA_DATA_DIR`` (its ``glue`` folder) or ``../shared/data``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from fedlora.adapters import resolve_model_path
from fedlora.data.loading import load_task

ROOT = Path(__file__).resolve().parents[1]


def _glue() -> str:
    root = Path(os.environ.get("FEDLORA_DATA_DIR", ROOT.parent / "shared" / "data"))
    return str(root if root.name == "glue" else root / "glue")


def _model():
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model_path("minilm")
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)


def _pool(out, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "mean":
        m = mask.unsqueeze(-1).float()
        return (out.last_hidden_state * m).sum(1) / m.sum(1)
    return out.pooler_output if pooling == "pooler" else out.last_hidden_state[:, 0]


def probe(task: str) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import matthews_corrcoef

    tok, model = _model()
    model.eval()
    train, dev = load_task(task, _glue(), "train"), load_task(task, _glue(), "dev")
    idx = np.random.default_rng(0).permutation(len(train))[:6000]

    def features(texts):
        out = {"cls": [], "pooler": [], "mean": []}
        for s in range(0, len(texts), 64):
            enc = tok(texts[s:s + 64], truncation=True, max_length=64, padding=True, return_tensors="pt")
            with torch.no_grad():
                o = model(**enc)
            for k in out:
                out[k].append(_pool(o, enc["attention_mask"], k))
        return {k: torch.cat(v).numpy() for k, v in out.items()}

    ftr, fdv = features([train.texts[i] for i in idx]), features(dev.texts)
    for k in ftr:
        for c in (0.1, 1.0, 10.0):
            clf = LogisticRegression(C=c, max_iter=3000).fit(ftr[k], train.labels[idx])
            predicted = clf.predict(fdv[k])
            print(f"{task} {k:7s} C={c:<5}: dev accuracy {(predicted == dev.labels).mean():.3f}, "
                  f"MCC {matthews_corrcoef(dev.labels, predicted):.3f}", flush=True)


def finetune(pooling: str, steps: int, lr: float, all_layers: bool, batch: int, decay: bool) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tok, model = _model()
    targets = ["query", "key", "value", "dense"] if all_layers else ["query", "value"]
    enc = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    head = nn.Sequential(nn.Dropout(0.1), nn.Linear(model.config.hidden_size, 2))
    train, dev = load_task("sst2", _glue(), "train"), load_task("sst2", _glue(), "dev")
    order = np.random.default_rng(0).permutation(len(train))
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad] + list(head.parameters()), lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min((k + 1) / warm, (steps - k) / (steps - warm)) if decay else 1.0)

    def logits(texts):
        b = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
        return head(_pool(enc(**b), b["attention_mask"], "pooler" if pooling == "cls" else pooling))

    def accuracy():
        enc.eval(), head.eval()
        with torch.no_grad():
            hits = sum(int((logits(dev.texts[s:s + 128]).argmax(-1).numpy() == dev.labels[s:s + 128]).sum())
                       for s in range(0, len(dev), 128))
        enc.train(), head.train()
        return hits / len(dev)

    t0 = time.time()
    for step in range(steps):
        ids = order[(step * batch) % len(order):][:batch]
        loss = nn.functional.cross_entropy(logits([train.texts[i] for i in ids]), torch.tensor(train.labels[ids]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 8) == 0:
            print(f"{pooling} step {step + 1}: dev accuracy {accuracy():.3f} ({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    sub.add_parser("probe").add_argument("--task", default="sst2", choices=["sst2", "cola"])
    ft = sub.add_parser("finetune")
    ft.add_argument("pooling", choices=["cls", "mean"])
    ft.add_argument("steps", type=int)
    ft.add_argument("lr", type=float)
    ft.add_argument("--all", action="store_true", help="LoRA on every attention and MLP projection")
    ft.add_argument("--batch", type=int, default=16)
    ft.add_argument("--decay", action="store_true", help="warmup (5 %% of steps), then linear decay to 0")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.mode == "probe":
        probe(args.task)
    else:
        finetune(args.pooling, args.steps, args.lr, args.all, args.batch, args.decay)


if __name__ == "__main__":
    main()
