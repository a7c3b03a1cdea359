"""FLOPs and memory of one local training step, counted from the model's own shapes.

The device time model (METHODS.md) prices a client's step when it trains the LoRA factors of only its top
``depth`` transformer blocks, plus the head. :class:`ModelCost` reads the shapes once, then prices any
batch, mean length ``T`` and depth; ``tokens = batch * T``. Only matrix products count, as in
``torch.utils.flop_counter.FlopCounterMode`` (mm, addmm, bmm, attention kernels); norms, activations,
softmax and embedding lookups cost 0.

Forward, every block: ``2 * params * tokens`` per linear, ``4 T^2 d`` per example for attention (``Q K^T``
and ``P V`` over width ``d``), ``2 r (d_in + d_out) tokens`` per LoRA branch; each head linear on the rows
it sees (BERT's pooler and classifier: one per example; ``lm_head`` or GPT-2's ``score``: every token).

Backward, only through the top ``depth`` blocks and the head (below them nothing needs a gradient):

- a frozen linear costs its forward again, for the gradient of its input;
- a LoRA branch costs ``2 r d_out tokens`` twice (``dB``, the gradient into ``B``), ``2 r d_in tokens`` for
  ``dA`` and, if its input needs a gradient, ``2 r d_in tokens`` more;
- attention costs twice its forward (the products giving ``dP``, ``dV``, ``dQ``, ``dK``);
- the lowest trained block's input needs no gradient, so neither do the linears that depend on it only
  through frozen weights (with LoRA on query and value: key, query, value cost 0), nor ``dK`` there;
- a head linear costs ``dW`` if it trains, and its input gradient once ``depth >= 1``.

Which linears those are is dataflow, not shape: one probe forward of a 7-token sequence, with every
block's input detached and every LoRA factor requiring grad, records for each linear whether its input
needs a gradient, how many rows it sees and whether it runs at all (only the active adapter and the
active head copy count), and each block's attention width and operands. Assumed: both LoRA factors train
(a frozen ``A`` saves ``2 r d_in tokens`` per module), a head linear trains iff its weight requires grad
at :meth:`ModelCost.from_model`, ``T^2`` is that of the mean length, and a fused attention kernel's
backward is priced by the products it needs (``FlopCounterMode`` prices a GPU kernel's at five, with the
recomputed scores). Exact against ``FlopCounterMode`` for BERT, GPT-2 and LLaMA with eager attention; with
``sdpa`` on CPU and no attention dropout, ``FlopCounterMode`` sees the fused CPU kernel as 0 FLOPs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_PEFT_PREFIX = "base_model.model."
_PROBE_LEN = 7  # probe sequence length: odd and prime, so a (T, T) shape is attention, not a head size
_LORA_FACTOR = re.compile(r"^(.*)\.lora_([AB])\.([^.]+)$")
_MATMULS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm}


def _strip(name: str) -> str:
    return name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name


def transformer_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's stack of transformer blocks, input side first.

    Found as the longest ``nn.ModuleList`` whose children all have the same class (``bert.encoder.layer``,
    ``transformer.h``, ``model.layers``); the first such list wins a tie.

    Returns the list's qualified name (as in ``model.named_modules()``) and its blocks.
    """
    best: tuple[str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(child) for child in module}) == 1 and (best is None or len(module) > len(best[1])):
                best = (name, list(module))
    if best is None:
        raise ValueError(f"no transformer blocks in {type(model).__name__}: no ModuleList of one class")
    return best


def block_index(model: nn.Module, module_names: Iterable[str]) -> dict[str, int]:
    """For each module name, the index (0 = input side) of the transformer block containing it.

    Names are as in ``model.named_modules()``, with or without PEFT's ``base_model.model.`` prefix; a name
    in no block (an embedding, a head) raises ``ValueError``.
    """
    stack = _strip(transformer_blocks(model)[0])
    pattern = re.compile(rf"^{re.escape(stack)}\.(\d+)(\.|$)")
    index = {}
    for name in module_names:
        match = pattern.match(_strip(name))
        if match is None:
            raise ValueError(f"module {name!r} is in no transformer block ({stack}.<i>)")
        index[name] = int(match.group(1))
    return index


def top_blocks(num_blocks: int, depth: int) -> range:
    """Indices of the top ``depth`` of ``num_blocks`` blocks (counted from the output side)."""
    if not 0 <= depth <= num_blocks:
        raise ValueError(f"depth must be in 0..{num_blocks}, got {depth}")
    return range(num_blocks - depth, num_blocks)


class LoraShape(NamedTuple):
    d_in: int
    d_out: int
    rank: int
    input_grad: bool  # its input needs a gradient when its block is the lowest that trains


@dataclass(frozen=True)
class BlockCost:
    """One block's shapes: linear FLOPs per token are ``2 * linear_params``."""

    linear_params: float      # weight elements of the linears that run (times their rows per token)
    input_params: float       # of them, those whose input needs no gradient when this block is the lowest
    width: float              # attention width d: forward 4 T^2 d per example
    low_attention: float      # share of the attention backward run when this block is the lowest trained
    heads: float              # attention heads (probabilities kept: heads * T^2 per example)
    lora: tuple[LoraShape, ...]
    activations: float        # elements kept per token for backward (linear inputs and outputs)


@dataclass(frozen=True)
class HeadLinear:
    params: int
    d_in: int
    per_token: bool  # sees every token (lm_head, GPT-2 score) or one row per example (pooler, classifier)
    trains: bool


@dataclass(frozen=True)
class StepCost:
    """FLOPs of one training step."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclass(frozen=True)
class ModelCost:
    """Per-block shapes read once from a model; costs then for any batch, length and depth."""

    blocks: tuple[BlockCost, ...]
    head: tuple[HeadLinear, ...]
    param_bytes: int   # every parameter, in its dtype
    itemsize: int      # bytes per activation and per trained-parameter element

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelCost:
        """Read ``model``'s shapes (a transformers model taking ``input_ids``, PEFT-wrapped or not).

        Runs one 7-token forward probe; the model's ``requires_grad`` flags and train/eval modes are
        restored after, and no random numbers are drawn.
        """
        stack, blocks = transformer_blocks(model)
        trains = {name: p.requires_grad for name, p in model.named_parameters()}
        linears, attention = _probe(model, blocks)
        lin, inp, act = ([0.0] * len(blocks) for _ in range(3))
        factors: list[dict] = [{} for _ in blocks]
        head = []
        for name, (d_in, d_out, rows, input_grad) in linears.items():
            factor = _LORA_FACTOR.match(name)
            if not name.startswith(stack + "."):
                if factor is None:  # LoRA on a head linear is not counted
                    trained = trains.get(name + ".weight", False)
                    head.append(HeadLinear(d_in * d_out, d_in, rows >= _PROBE_LEN, trained))
                continue
            i = int(name[len(stack) + 1:].split(".")[0])
            if factor is not None:  # both factors of one LoRA module, keyed by module and adapter
                module = factors[i].setdefault((factor.group(1), factor.group(3)), {})
                module[factor.group(2)] = (d_in, d_out, input_grad)
                continue
            lin[i] += d_in * d_out * rows / _PROBE_LEN
            inp[i] += 0.0 if input_grad else d_in * d_out * rows / _PROBE_LEN
            act[i] += (d_in + d_out) * rows / _PROBE_LEN
        costs = []
        for i, attn in enumerate(attention):
            lora = tuple(LoraShape(f["A"][0], f["B"][1], f["A"][1], f["A"][2])
                         for f in factors[i].values() if len(f) == 2)
            share = attn["low"] / (2 * attn["flops"]) if attn["flops"] else 0.0
            width = attn["flops"] / (4 * _PROBE_LEN**2)
            kept = act[i] + sum(s.rank for s in lora)
            costs.append(BlockCost(lin[i], inp[i], width, share, attn["heads"], lora, kept))
        params = list(model.parameters())
        itemsize = next((p.element_size() for p in params if p.is_floating_point()), 4)
        return cls(tuple(costs), tuple(head), sum(p.numel() * p.element_size() for p in params), itemsize)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def step(self, batch_size: int, seq_len: float, depth: int | None = None) -> StepCost:
        """FLOPs of one step (the module docstring says what is counted).

        Parameters
        ----------
        batch_size : int
            Sequences per step.
        seq_len : float
            Tokens per sequence (a client's mean length).
        depth : int or None (default: None)
            Top blocks whose LoRA factors train, ``0..num_blocks``; None: all. The head always trains.
        """
        depth = self._check(batch_size, seq_len, depth)
        tokens, t2 = batch_size * seq_len, batch_size * seq_len**2
        lowest = self.num_blocks - depth
        forward = backward = 0.0
        for i, b in enumerate(self.blocks):
            forward += 2 * b.linear_params * tokens + 4 * b.width * t2
            forward += sum(2 * s.rank * (s.d_in + s.d_out) for s in b.lora) * tokens
            if i < lowest:
                continue
            first = i == lowest
            backward += 2 * (b.linear_params - (b.input_params if first else 0.0)) * tokens
            backward += 8 * b.width * t2 * (b.low_attention if first else 1.0)
            backward += sum(2 * s.rank * (2 * s.d_out + s.d_in * (2 if s.input_grad or not first else 1))
                            for s in b.lora) * tokens
        for h in self.head:
            rows = tokens if h.per_token else batch_size
            forward += 2 * h.params * rows
            backward += 2 * h.params * rows * (int(h.trains) + int(depth > 0))
        return StepCost(forward, backward)

    def memory_bytes(self, batch_size: int, seq_len: float, depth: int | None = None) -> float:
        """Estimated bytes of one step, arguments as :meth:`step`.

        Every weight in its dtype; the activations the top ``depth`` blocks and the head keep for backward
        (each linear's input and output, attention scores and probabilities); gradient and two AdamW
        moments of every trained LoRA factor and head linear. Not counted: allocator overhead, transient
        buffers, the forward-only activations of frozen blocks.
        """
        depth = self._check(batch_size, seq_len, depth)
        kept = trained = 0.0
        for b in self.blocks[self.num_blocks - depth:]:
            kept += batch_size * (seq_len * b.activations + 2 * b.heads * seq_len**2)
            trained += sum(s.rank * (s.d_in + s.d_out) for s in b.lora)
        for h in self.head:
            if h.trains or depth > 0:
                kept += (batch_size * seq_len if h.per_token else batch_size) * h.d_in
            trained += h.params if h.trains else 0
        return self.param_bytes + (kept + 3 * trained) * self.itemsize

    def _check(self, batch_size: int, seq_len: float, depth: int | None) -> int:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not seq_len > 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        depth = self.num_blocks if depth is None else depth
        top_blocks(self.num_blocks, depth)
        return depth


# ---------------------------------------------------------------- the probe


class _AttentionRecorder(TorchFunctionMode):
    """Records the activation-by-activation products (attention) run inside the current block."""

    def __init__(self, num_blocks: int):
        super().__init__()
        self.block: int | None = None
        self.stats = [dict(flops=0.0, low=0.0, heads=0.0) for _ in range(num_blocks)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.block is None:
            return out
        stats = self.stats[self.block]
        if func in _MATMULS and len(args) == 2 and not any(isinstance(a, nn.Parameter) for a in args):
            a, b = args
            if out.shape[-2:] == (_PROBE_LEN, _PROBE_LEN) or a.shape[-2:] == (_PROBE_LEN, _PROBE_LEN):
                flops = 2 * out.numel() * a.shape[-1]
                stats["flops"] += flops
                stats["low"] += flops * (int(a.requires_grad) + int(b.requires_grad))  # dA and dB products
                if out.shape[-2:] == (_PROBE_LEN, _PROBE_LEN):
                    stats["heads"] += out.numel() / _PROBE_LEN**2
        elif func is nn.functional.scaled_dot_product_attention:
            q, k, v = (*args[:3], *(kwargs[n] for n in ("query", "key", "value")[len(args[:3]):]))
            half = 2 * q.numel() * k.shape[-2]  # each of Q K^T and P V
            stats["flops"] += 2 * half
            grads = (q.requires_grad or k.requires_grad) + q.requires_grad + k.requires_grad + v.requires_grad
            stats["low"] += half * grads  # as the two products would: dP, dQ, dK, dV
            stats["heads"] += q.numel() / (q.shape[-2] * q.shape[-1])
        return out


def _probe(model: nn.Module, blocks: list[nn.Module]) -> tuple[dict, list[dict]]:
    """One forward of a 7-token sequence, every block's input detached and only the LoRA factors requiring
    grad (flags and training modes restored after; eval mode, so no random draws).

    Returns each linear that ran, ``name -> (d_in, d_out, rows seen, input needs grad)``, and per block the
    attention's forward FLOPs, its backward FLOPs when the block is the lowest trained, and its heads.
    """
    params = dict(model.named_parameters())
    saved_grad = {name: p.requires_grad for name, p in params.items()}
    saved_mode = {m: m.training for m in model.modules()}
    recorder = _AttentionRecorder(len(blocks))
    linears: dict[str, tuple[int, int, int, bool]] = {}
    handles = []

    def on_linear(name):
        def hook(module, inputs, output):
            x = inputs[0]
            seen = linears[name][2] if name in linears else 0
            linears[name] = (x.shape[-1], output.shape[-1], seen + x.numel() // x.shape[-1], x.requires_grad)
        return hook

    def enter(i):
        def hook(module, args, kwargs):
            recorder.block = i  # the block's input needs no gradient: as when it is the lowest that trains
            if args and isinstance(args[0], torch.Tensor):
                args = (args[0].detach(), *args[1:])
            elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].detach()}
            return args, kwargs
        return hook

    def leave(module, inputs, output):
        recorder.block = None

    try:
        for name, p in params.items():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":  # GPT-2's (d_in, d_out)
                handles.append(module.register_forward_hook(on_linear(name)))
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(enter(i), with_kwargs=True))
            handles.append(block.register_forward_hook(leave))
        model.eval()
        device = next(iter(params.values())).device
        ids = torch.ones((1, _PROBE_LEN), dtype=torch.long, device=device)
        with torch.enable_grad(), recorder:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
        for name, p in params.items():
            p.requires_grad_(saved_grad[name])
        for module, mode in saved_mode.items():
            module.training = mode
    return linears, recorder.stats
