"""Round messages: what the server sends a client (:class:`ClientTask`), what comes back
(:class:`ClientReply`), and their byte encoding.

One container for both: a safetensors file whose metadata entry ``"fedlora"`` holds a JSON header with
every field that is not a tensor. Tensors keep dtype and bits (empty ``(m, 0)`` / ``(0, n)`` factors
included); header floats round-trip exactly, since Python's ``json`` writes the shortest repr that reads
back to the same double (NaN and infinities as ``NaN`` / ``Infinity``). Nothing is pickled, so decoding
untrusted bytes runs no code. Tensor names are positional (``adapter.0.B``) and the header lists module
names in order, so any module or client name survives and dict order is kept.

Checks are structural (fields, types, format version, shapes that chain) and run on construction, on
encoding and on decoding; a NaN in a tensor is left to the aggregator. Tensors come back on the CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..types import LoRAFactors, LowRank
from .container import MessageError, _is_int, _is_real, _jsonable, _nbytes, _need, _pack, _Reader

TASK_FORMAT = "fedlora.task/1"
REPLY_FORMAT = "fedlora.reply/1"


@dataclass(kw_only=True)
class TrainSettings:
    """Local training of one round (the defaults are :class:`fedlora.config.TrainConfig`'s).

    Exactly one of ``local_steps`` and ``local_epochs`` is set. ``optimizer_state`` is ``"fresh"`` (new
    AdamW every round) or ``"kept"`` (the client keeps its optimizer state between its rounds). The last
    four fields are set by a method that prunes ranks locally (:meth:`fedlora.aggregators.Aggregator.
    local_training`); a client that pruned reports its new rank as ``metrics["rank"]``.
    """

    local_steps: int | None = 30
    local_epochs: float | None = None
    batch_size: int = 16
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    optimizer_state: str = "fresh"
    bf16: bool = False  # forward passes under bfloat16 autocast (CPU)
    # HetLoRA's local rank self-pruning (off by default): a penalty on the last ``penalty_ranks`` ranks'
    # norms, then trailing ranks whose share of ``||B A||_F`` is below ``prune_threshold`` are dropped.
    rank_penalty: float = 0.0
    penalty_ranks: int = 0
    prune_threshold: float = 0.0
    min_rank: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.local_steps is None or _is_int(self.local_steps, 1),
             "local_steps must be an int >= 1 or None"),
            (self.local_epochs is None or _is_real(self.local_epochs, 0, strict=True),
             "local_epochs must be a number > 0 or None"),
            ((self.local_steps is None) != (self.local_epochs is None),
             "set exactly one of local_steps and local_epochs"),
            (_is_int(self.batch_size, 1), "batch_size must be an int >= 1"),
            (_is_real(self.lr, 0, strict=True), "lr must be a number > 0"),
            (_is_real(self.weight_decay, 0), "weight_decay must be a number >= 0"),
            (_is_int(self.warmup_steps, 0), "warmup_steps must be an int >= 0"),
            (self.max_grad_norm is None or _is_real(self.max_grad_norm, 0, strict=True),
             "max_grad_norm must be a number > 0 or None"),
            (self.optimizer_state in ("fresh", "kept"), "optimizer_state must be 'fresh' or 'kept'"),
            (_is_real(self.rank_penalty, 0), "rank_penalty must be a number >= 0"),
            (_is_int(self.penalty_ranks, 0), "penalty_ranks must be an int >= 0"),
            (_is_real(self.prune_threshold, 0) and self.prune_threshold < 1, "prune_threshold must lie in [0, 1)"),
            (_is_int(self.min_rank, 1), "min_rank must be an int >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}, got {asdict(self)}")


@dataclass(kw_only=True, eq=False)
class ClientTask:
    """Everything a client needs for one round.

    ``adapter`` is the starting adapter of every module at the client's ``rank``; ``frozen`` are low-rank
    terms (scale included, linear orientation) the client adds to its frozen weights for this round only;
    ``catch_up`` is the correction to the frozen weights the client lacks, from round version
    ``catch_up_from`` to ``catch_up_to`` (see :class:`~fedlora.protocol.history.CorrectionHistory`), folded
    for good. ``modules`` is the subset that trains (None: all); the others run no backward pass and are
    not sent back. ``seed`` is the round's seed stream for this client, e.g. ``[run_seed, round, index]``.
    ``privacy`` and ``extra`` are JSON-able dicts (lists, not tuples; string keys).
    """

    round: int
    client_id: str
    rank: int
    adapter: dict[str, LoRAFactors]
    frozen: dict[str, LowRank] = field(default_factory=dict)
    train_a: bool = True
    train_b: bool = True
    modules: list[str] | None = None
    head: dict[str, Tensor] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    proximal_mu: float = 0.0
    seed: list[int] = field(default_factory=list)
    catch_up: dict[str, LowRank] = field(default_factory=dict)
    catch_up_from: int | None = None
    catch_up_to: int | None = None
    privacy: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_task(self)


@dataclass(kw_only=True, eq=False)
class ClientReply:
    """What a client returns: the trained ``factors`` of the modules that trained, heads and statistics."""

    round: int
    client_id: str
    rank: int
    factors: dict[str, LoRAFactors]
    num_examples: int
    train_loss: float
    head: dict[str, Tensor] = field(default_factory=dict)
    label_histogram: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    sent_a: bool = True  # False when A did not train (FFA): only B crosses; A decodes as zeros

    def __post_init__(self) -> None:
        _check_reply(self)


# ---------------------------------------------------------------- checks

def _check_common(msg: ClientTask | ClientReply, kind: str, factors: Any, name: str) -> None:
    """Fields both messages have, and their adapter factors (which must chain at the declared rank)."""
    _need(_is_int(msg.round, 0), kind, f"round must be an int >= 0, got {msg.round!r}")
    _need(isinstance(msg.client_id, str), kind, f"client_id must be a string, got {msg.client_id!r}")
    _need(_is_int(msg.rank, 1), kind, f"rank must be an int >= 1, got {msg.rank!r}")
    _need(isinstance(msg.head, dict) and all(isinstance(k, str) and isinstance(v, Tensor)
                                             for k, v in msg.head.items()),
          kind, "head must map names to tensors")
    _need(isinstance(factors, dict), kind, f"{name} must be a dict of module -> LoRAFactors")
    for m, f in factors.items():
        where = f"{name} of module {m!r}"
        _need(isinstance(m, str), kind, f"{name}: module names must be strings, got {m!r}")
        _need(isinstance(f, LoRAFactors) and isinstance(f.B, Tensor) and isinstance(f.A, Tensor), kind,
              f"{where} must be LoRAFactors of tensors, got {type(f).__name__}")
        _need(f.B.ndim == 2 and f.A.ndim == 2 and f.B.shape[1] == f.A.shape[0], kind,
              f"{where}: B {tuple(f.B.shape)} and A {tuple(f.A.shape)} do not chain")
        _need(f.rank == msg.rank, kind, f"{where} has rank {f.rank}, the message declares rank {msg.rank}")
        _need(_is_real(f.scale), kind, f"{where}: scale must be a number, got {f.scale!r}")


def _check_task(t: ClientTask) -> None:
    kind = "task"
    _check_common(t, kind, t.adapter, "adapter")
    for name, terms in (("frozen", t.frozen), ("catch_up", t.catch_up)):
        _need(isinstance(terms, dict), kind, f"{name} must be a dict of module -> LowRank")
        for m, term in terms.items():
            _need(isinstance(term, LowRank), kind, f"{name} of module {m!r} must be a LowRank")
            _need(m in t.adapter, kind, f"{name} names module {m!r}, which has no adapter")
            _need(term.shape == t.adapter[m].shape, kind,
                  f"{name} of module {m!r} is {term.shape}, the adapter is {t.adapter[m].shape}")
    _need(isinstance(t.train_a, bool) and isinstance(t.train_b, bool), kind,
          "train_a and train_b must be bools")
    if t.modules is not None:
        _need(isinstance(t.modules, list) and all(isinstance(m, str) for m in t.modules)
              and len(set(t.modules)) == len(t.modules), kind,
              f"modules must be None or a list of distinct module names, got {t.modules!r:.80}")
        unknown = [m for m in t.modules if m not in t.adapter]
        _need(not unknown, kind, f"modules names {unknown[:3]}, which have no adapter")
    _need(isinstance(t.train, TrainSettings), kind,
          f"train must be TrainSettings, got {type(t.train).__name__}")
    _need(_is_real(t.proximal_mu, 0), kind, f"proximal_mu must be a number >= 0, got {t.proximal_mu!r}")
    # numpy's SeedSequence takes non-negative ints only.
    _need(isinstance(t.seed, list) and all(_is_int(s, 0) for s in t.seed), kind,
          f"seed must be a list of ints >= 0, got {t.seed!r:.80}")
    versions = (t.catch_up_from, t.catch_up_to)
    _need(all(v is None or _is_int(v, 0) for v in versions)
          and (versions[0] is None) == (versions[1] is None), kind,
          f"catch_up_from and catch_up_to must both be None or both ints >= 0, got {versions}")
    _need(versions[0] is None or versions[0] <= versions[1], kind, f"catch_up_from > catch_up_to: {versions}")
    _need(not t.catch_up or versions[0] is not None, kind, "catch_up given without catch_up_from/catch_up_to")
    for name in ("privacy", "extra"):
        value = getattr(t, name)
        _need(isinstance(value, dict) and _jsonable(value), kind,
              f"{name} must be a JSON-able dict (string keys, lists not tuples), got {value!r:.80}")


def _check_reply(r: ClientReply) -> None:
    kind = "reply"
    _check_common(r, kind, r.factors, "factors")
    _need(_is_int(r.num_examples, 0), kind, f"num_examples must be an int >= 0, got {r.num_examples!r}")
    _need(_is_real(r.train_loss), kind, f"train_loss must be a number, got {r.train_loss!r}")
    _need(r.label_histogram is None or isinstance(r.label_histogram, Tensor), kind,
          f"label_histogram must be a tensor or None, got {type(r.label_histogram).__name__}")
    _need(isinstance(r.metrics, dict)
          and all(isinstance(k, str) and _is_real(v) for k, v in r.metrics.items()), kind,
          f"metrics must map names to numbers, got {r.metrics!r:.80}")


def task_tensor_bytes(task: ClientTask) -> int:
    """``message_sizes(encode_task(task))["tensor_bytes"]`` without encoding (``A`` counts too)."""
    return _nbytes(*(t for f in task.adapter.values() for t in (f.B, f.A)),
                   *(t for c in (*task.frozen.values(), *task.catch_up.values()) for t in (c.left, c.right)),
                   *task.head.values())


def reply_tensor_bytes(reply: ClientReply) -> int:
    """``message_sizes(encode_reply(reply))["tensor_bytes"]`` without encoding."""
    histogram = () if reply.label_histogram is None else (reply.label_histogram,)
    sides = (lambda f: (f.B, f.A)) if reply.sent_a else (lambda f: (f.B,))
    return _nbytes(*(t for f in reply.factors.values() for t in sides(f)), *reply.head.values(), *histogram)


_PARTS = {"adapter": "BA", "factors": "BA", "frozen": ("left", "right"), "catch_up": ("left", "right"),
          "head": ("value",), "label_histogram": ("value",)}


# ---------------------------------------------------------------- public encoders

def encode_task(task: ClientTask) -> bytes:
    """``task`` as bytes: safetensors with a JSON header; :func:`decode_task` restores it exactly."""
    _check_task(task)  # the dataclass may have changed since it was built
    header = {
        "format": TASK_FORMAT, "round": task.round, "client_id": task.client_id, "rank": task.rank,
        "adapter_scales": [float(f.scale) for f in task.adapter.values()],
        "train_a": task.train_a, "train_b": task.train_b,
        "modules": None if task.modules is None else list(task.modules),
        "train": asdict(task.train), "proximal_mu": float(task.proximal_mu), "seed": list(task.seed),
        "catch_up_from": task.catch_up_from, "catch_up_to": task.catch_up_to,
        "privacy": task.privacy, "extra": task.extra,
    }
    groups = {
        "adapter": {m: (f.B, f.A) for m, f in task.adapter.items()},
        "frozen": {m: (t.left, t.right) for m, t in task.frozen.items()},
        "catch_up": {m: (t.left, t.right) for m, t in task.catch_up.items()},
        "head": {k: (v,) for k, v in task.head.items()},
    }
    return _pack(header, groups, _PARTS)


def decode_task(data: bytes) -> ClientTask:
    """Inverse of :func:`encode_task`; raises :class:`MessageError` on anything malformed."""
    r = _Reader(data, TASK_FORMAT)
    train = r.value("train")
    _need(isinstance(train, dict), "task header", f"field 'train' must be an object, got {train!r:.80}")
    try:
        settings = TrainSettings(**train)
    except (TypeError, ValueError) as err:
        raise MessageError(f"task: field 'train': {err}") from None
    values = {name: r.value(name) for name in (
        "round", "client_id", "rank", "train_a", "train_b", "modules", "proximal_mu", "seed",
        "catch_up_from", "catch_up_to", "privacy", "extra")}
    head = {k: v for k, (v,) in r.group("head", ("value",)).items()}
    task = ClientTask(adapter=r.factors("adapter"), frozen=r.terms("frozen"), catch_up=r.terms("catch_up"),
                      head=head, train=settings, **values)
    r.finish()
    return task


def encode_reply(reply: ClientReply) -> bytes:
    """``reply`` as bytes; :func:`decode_reply` restores it exactly."""
    _check_reply(reply)
    header = {
        "format": REPLY_FORMAT, "round": reply.round, "client_id": reply.client_id, "rank": reply.rank,
        "factors_scales": [float(f.scale) for f in reply.factors.values()],
        "num_examples": reply.num_examples, "train_loss": float(reply.train_loss),
        "metrics": {k: float(v) for k, v in reply.metrics.items()}, "sent_a": bool(reply.sent_a),
    }
    if not reply.sent_a:  # B only; A's width travels in the header
        header["factors_in_features"] = [f.A.shape[1] for f in reply.factors.values()]
    histogram = {} if reply.label_histogram is None else {"label_histogram": (reply.label_histogram,)}
    groups = {
        "factors": {m: (f.B, f.A) if reply.sent_a else (f.B,) for m, f in reply.factors.items()},
        "head": {k: (v,) for k, v in reply.head.items()},
        "label_histogram": histogram,  # a group of zero or one entry
    }
    return _pack(header, groups, {**_PARTS, "factors": "BA" if reply.sent_a else "B"})


def decode_reply(data: bytes) -> ClientReply:
    """Inverse of :func:`encode_reply`; raises :class:`MessageError` on anything malformed."""
    r = _Reader(data, REPLY_FORMAT)
    values = {name: r.value(name) for name in ("round", "client_id", "rank", "num_examples", "train_loss",
                                               "metrics")}
    histogram = r.group("label_histogram", ("value",))
    _need(set(histogram) <= {"label_histogram"}, "reply header",
          "field 'label_histogram' must be [] or ['label_histogram']")
    head = {k: v for k, (v,) in r.group("head", ("value",)).items()}
    sent_a = r.value("sent_a")
    _need(isinstance(sent_a, bool), "reply header", f"field 'sent_a' must be a boolean, got {sent_a!r:.40}")
    factors = r.factors("factors") if sent_a else _b_only_factors(r, values["rank"])
    reply = ClientReply(factors=factors, head=head, **values, sent_a=sent_a,
                        label_histogram=histogram["label_histogram"][0] if histogram else None)
    r.finish()
    return reply


def _b_only_factors(r: _Reader, rank: Any) -> dict[str, LoRAFactors]:
    """Factors of a reply that sent only ``B``: ``A`` comes back as zeros of the recorded width."""
    tensors, scales, widths = r.group("factors", "B"), r.value("factors_scales"), r.value("factors_in_features")
    ok = (isinstance(scales, list) and isinstance(widths, list) and len(scales) == len(widths) == len(tensors)
          and all(_is_real(s) for s in scales) and all(_is_int(w, 0) for w in widths) and _is_int(rank, 1))
    _need(ok, "reply header", "fields 'factors_scales' and 'factors_in_features' must hold one entry per module")
    return {m: LoRAFactors(B, torch.zeros(rank, w, dtype=B.dtype), float(s))
            for (m, (B,)), s, w in zip(tensors.items(), scales, widths)}
