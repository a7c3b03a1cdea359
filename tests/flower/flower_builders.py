"""Builders shared by the Flower tests: protocol messages with every kind of field (float32
and float64 factors, empty factors, frozen terms, catch-up, bf16 heads)."""

from __future__ import annotations

import math

import torch

from fedlora.protocol import ClientReply, ClientTask, TrainSettings
from fedlora.types import LoRAFactors, LowRank

SHAPES = {"base_model.model.encoder.layer.0.attention.self.query": (8, 6), "layer.1/value": (5, 7),
          "módulo ü": (3, 3)}
SCALES = [1 / 3, 16 / math.sqrt(7), 5e-324, 0.1 + 0.2]
CLIENT_IDS = ["hospital-a", "0", "", "клиника/β 7", 'quote"back\\slash\nnewline']


# ---------------------------------------------------------------- builders

def rand(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def make_task(seed: int, client_id: str = "hospital-a") -> ClientTask:
    """float32 factors (one float64 module), zero-rank and real frozen terms, catch-up, a module subset,
    float32 and bfloat16 heads; seed 3 adds a module whose factors are empty ``(0, r)`` / ``(r, 0)``."""
    gen = torch.Generator().manual_seed(seed)
    rank = [1, 2, 4][seed % 3]
    dtypes = [torch.float32, torch.float32, torch.float64]
    shapes = {**SHAPES, "empty": (0, 0)} if seed == 3 else SHAPES
    adapter = {
        m: LoRAFactors(rand(gen, d_out, rank, dtype=dt), rand(gen, rank, d_in, dtype=dt),
                       SCALES[(i + seed) % 4])
        for i, ((m, (d_out, d_in)), dt) in enumerate(zip(shapes.items(), dtypes + [torch.float32]))
    }
    names = list(SHAPES)
    (m0, (a0, b0)), (m1, (a1, b1)) = list(SHAPES.items())[:2]
    return ClientTask(
        round=seed, client_id=client_id, rank=rank, adapter=adapter,
        frozen={m0: LowRank(torch.zeros(a0, 0), torch.zeros(0, b0)),
                m1: LowRank(rand(gen, a1, 3), rand(gen, 3, b1))},
        train_a=bool(seed % 2), train_b=True, modules=[names[2], names[0]],
        head={"classifier.dense.weight": rand(gen, 2, 8, dtype=torch.bfloat16),
              "classifier.dense.bias": rand(gen, 2), "empty": torch.zeros(0, 4)},
        train=TrainSettings(local_steps=None, local_epochs=1.5, batch_size=8, lr=3e-4, weight_decay=0.01,
                            warmup_steps=2, max_grad_norm=None, optimizer_state="kept"),
        proximal_mu=0.01, seed=[12345, seed, 7],
        catch_up={m1: LowRank(rand(gen, a1, 5), rand(gen, 5, b1))}, catch_up_from=1, catch_up_to=seed + 3,
        privacy={"clip": 1.0, "noise_multiplier": None},
        extra={"note": "x", "nested": {"a": [1, 2.5, "s", True, None]}, "big": 2**70},
    )


def make_reply(seed: int, histogram: bool = True, sent_a: bool = True) -> ClientReply:
    gen = torch.Generator().manual_seed(seed)
    m, (d_out, d_in) = next(iter(SHAPES.items()))
    a = (lambda *s, dtype=torch.float32: rand(gen, *s, dtype=dtype)) if sent_a else \
        (lambda *s, dtype=torch.float32: torch.zeros(*s, dtype=dtype))  # what a B-only reply decodes to
    return ClientReply(
        round=seed, client_id=CLIENT_IDS[seed % len(CLIENT_IDS)], rank=3,
        factors={m: LoRAFactors(rand(gen, d_out, 3), a(3, d_in), SCALES[seed % 4]),
                 "second": LoRAFactors(rand(gen, 2, 3, dtype=torch.float64), a(3, 4, dtype=torch.float64),
                                       2.0),
                 "wide-empty": LoRAFactors(rand(gen, 0, 3), a(3, 0), 1.0)},
        head={"score.weight": rand(gen, 3, 6, dtype=torch.bfloat16)},
        num_examples=117 + seed,
        label_histogram=torch.tensor([3.0, 0.0, 114.0], dtype=torch.float64) if histogram else None,
        train_loss=0.6931471805599453, metrics={"accuracy": 0.75, "steps": 30.0}, sent_a=sent_a,
    )
