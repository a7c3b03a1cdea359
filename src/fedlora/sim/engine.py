"""The in-process federated engine: one base model in memory, client adapters swapped in and out.

Per round: seeded client sampling; for each client, its payload (adapter factors, head) is written into the
shared PEFT model, it trains locally, and its factors are copied out; the aggregator combines them; the
corrections to the frozen weights are folded once, in place, in float32; the global model is evaluated; a
metrics record and an atomic checkpoint are written. Memory grows with the clients' adapters (and kept
optimizer states), never with copies of the model.

Everything random is derived from ``(seed, round, client)``, so a run resumed from the checkpoint of round
``t`` replays rounds ``t+1..`` exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from .. import adapters, checkpoint, lowrank
from ..aggregators import AGGREGATORS, Aggregator, get_aggregator, validate_update
from ..config import RunConfig
from ..report import MetricsWriter
from ..types import AggregationInputError, ClientUpdate, LoRAFactors, LowRank, ModuleState
from .client import local_batches, predict, train_local
from .data import FederatedData, build_federated_data, score

log = logging.getLogger("fedlora")


class Simulation:
    """Run a federated experiment described by a :class:`~fedlora.config.RunConfig`.

    ``Simulation(cfg).run()`` trains all rounds; ``Simulation.resume(run_dir).run()`` continues the newest
    checkpoint of ``run_dir``.
    """

    def __init__(self, cfg: RunConfig, *, progress: bool = True):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.progress = progress
        self.aggregator: Aggregator = self.check(cfg)  # method and model fail before any data is read
        self.skipped: list[str] = []
        self.data: FederatedData = build_federated_data(cfg, self.run_dir)
        base, self.tokenizer = adapters.load_base_model(cfg.model, self.data.num_labels, cfg.seed)
        self.data.encode(self.tokenizer, cfg.model.max_length)
        self.model = adapters.attach_lora(base, cfg.lora, cfg.model.task_type)
        self.layers = adapters.lora_layers(self.model)
        self.client_ranks = self._client_ranks()
        self.global_state: dict[str, ModuleState] = adapters.read_state(self.layers)
        self.global_head = {k: p.detach().clone() for k, p in adapters.head_parameters(self.model).items()}
        self.corrections: list[dict[str, LowRank]] = []  # one dict per round, in order
        self.optimizer_states: dict[str, dict] = {}
        self.records: list[dict] = []
        self.next_round = 0

    @staticmethod
    def check(cfg: RunConfig) -> Aggregator:
        """The run's aggregator, after checking its options and that the model can be found (one-line errors)."""
        try:
            aggregator = get_aggregator(cfg.federation.method, **cfg.federation.method_options)
        except ValueError as err:
            key = "federation.method_options" if cfg.federation.method in AGGREGATORS else "federation.method"
            raise ValueError(f"{key}: {err}") from None
        adapters.check_model(cfg.model)
        return aggregator

    # ------------------------------------------------------------------ setup helpers
    def _client_ranks(self) -> dict[str, int]:
        """Each client's LoRA rank (``lora.client_ranks`` cycled); other ranks get adapters of their own."""
        ranks = self.cfg.lora.client_ranks or [self.cfg.lora.rank]
        out = {cid: ranks[i % len(ranks)] for i, cid in enumerate(self.data.client_ids)}
        for r in sorted(set(out.values()) - {self.cfg.lora.rank}):
            adapters.add_rank_adapter(self.model, self.cfg.lora, self.cfg.model.task_type, r)
        adapters.activate(self.model, adapters.ADAPTER)
        return out

    def _adapter_for(self, cid: str) -> str:
        rank = self.client_ranks[cid]
        return adapters.ADAPTER if rank == self.cfg.lora.rank else adapters.rank_adapter_name(rank)

    @classmethod
    def resume(cls, run_dir: str | Path, *, rounds: int | None = None, progress: bool = True) -> Simulation:
        """Rebuild a run from its newest intact checkpoint; ``rounds`` extends a run to that many rounds.

        A damaged newer round (a checksum that does not match, a missing or truncated file) is passed over
        with a warning naming it, and its folder is removed: the rounds after the one resumed are redone,
        exactly as the uninterrupted run did them.
        """
        from ..config import ConfigError, config_from_dict

        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise checkpoint.CheckpointError(f"{run_dir}: no such run folder to resume")
        found = checkpoint.newest_intact_round(run_dir)
        state = checkpoint.load_state(found.folder)
        raw = state["config"]
        if rounds is not None:
            if rounds < found.number:
                raise ConfigError(
                    f"federation.rounds={rounds}: {run_dir} has already completed {found.number} rounds"
                )
            raw = {**raw, "federation": {**raw.get("federation", {}), "rounds": rounds}}
        cfg = config_from_dict(raw)
        cfg.output_dir = str(run_dir)
        sim = cls(cfg, progress=progress)
        for line in found.skipped:
            log.warning("%s", line)
        sim.skipped = found.skipped
        sim._restore(state)
        return sim

    def _restore(self, state: dict) -> None:
        completed = int(state["round"])
        checkpoint.remove_rounds_after(self.run_dir, completed)
        for r in range(1, completed + 1):  # replay every fold in order: bit-identical base weights
            corr = checkpoint.load_corrections(checkpoint.round_dir(self.run_dir, r))
            adapters.fold_corrections(self.layers, corr)
            self.corrections.append(corr)
        folder = checkpoint.round_dir(self.run_dir, completed)
        scales = {m: st.factors.scale for m, st in self.global_state.items()}
        factors, self.global_head = checkpoint.load_adapter(folder, scales, self.global_head)
        self.global_state = {m: ModuleState(f, self.global_state[m].layout) for m, f in factors.items()}
        self.optimizer_states = _unflatten_optimizers(checkpoint.load_tensors(folder, "optimizer"), state)
        self.records = list(state["metrics"])
        self.next_round = completed
        self._install_global()
        with MetricsWriter(self.run_dir, tensorboard=False) as writer:
            writer.truncate_after(completed)
        log.info("resumed %s after round %d", self.run_dir, completed)

    # ------------------------------------------------------------------ model state swaps
    def _install(self, factors: dict[str, LoRAFactors], head: dict[str, torch.Tensor], adapter: str) -> None:
        adapters.activate(self.model, adapter)
        adapters.write_factors(self.layers, factors, adapter)
        with torch.no_grad():
            for k, p in adapters.head_parameters(self.model, adapter).items():
                p.copy_(head[k])

    def _install_global(self) -> None:
        self._install({m: s.factors for m, s in self.global_state.items()}, self.global_head, adapters.ADAPTER)

    # ------------------------------------------------------------------ one client
    def _train_client(self, cid: str, round_idx: int) -> tuple[ClientUpdate, dict[str, torch.Tensor], float]:
        cfg = self.cfg
        adapter = self._adapter_for(cid)
        payload = self.aggregator.payload(self.global_state, self.client_ranks[cid], round_idx)
        start = {m: p.adapter for m, p in payload.items()}
        self._install(start, self.global_head, adapter)
        # A frozen low-rank term (HEXA's exact heterogeneous ranks) joins W for this client only; the
        # original weights are put back bit for bit afterwards.
        frozen = {m: p.frozen for m, p in payload.items() if p.frozen is not None and p.frozen.rank > 0}
        saved = {m: w.clone() for m, w in adapters.base_weights(self.layers, frozen).items()}
        adapters.fold_corrections(self.layers, frozen)
        try:
            train_a, train_b = self.aggregator.trains(round_idx)
            heads = adapters.head_parameters(self.model, adapter)
            params = adapters.adapter_parameters(self.layers, train_a, train_b, adapter) + list(heads.values())
            indices = self.data.train_indices[cid]
            steps = cfg.train.local_steps or max(
                1, int(np.ceil(cfg.train.local_epochs * len(indices) / cfg.train.batch_size))
            )
            torch.manual_seed(_seed(cfg.seed, round_idx, cid))  # dropout
            batches = local_batches(indices, cfg.train.batch_size, steps, [cfg.seed, round_idx, int(cid), 1])
            loss, opt_state = train_local(
                self.model, params, batches, self.data.train,
                steps=steps, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                warmup_steps=cfg.train.warmup_steps, max_grad_norm=cfg.train.max_grad_norm,
                optimizer_state=self.optimizer_states.get(cid) if cfg.train.optimizer_state == "kept" else None,
                penalty=self._proximal(start, adapter),
            )
        finally:
            with torch.no_grad():
                for m, w in adapters.base_weights(self.layers, saved).items():
                    w.copy_(saved[m])
        if cfg.train.optimizer_state == "kept":
            self.optimizer_states[cid] = opt_state
        trained = adapters.read_state(self.layers, adapter)
        update = ClientUpdate(
            client_id=cid,
            factors={m: s.factors for m, s in trained.items()},
            num_examples=len(indices),
            rank=self.client_ranks[cid],
            label_histogram=torch.as_tensor(self.data.histograms[cid], dtype=torch.float64),
        )
        head = {k: p.detach().clone() for k, p in heads.items()}
        adapters.activate(self.model, adapters.ADAPTER)
        return update, head, loss

    def _proximal(self, start: dict[str, LoRAFactors], adapter: str):
        mu = float(getattr(self.aggregator, "proximal_mu", 0.0))
        if mu <= 0:
            return None
        pairs = [(self.layers[m], f) for m, f in start.items()]

        def penalty() -> torch.Tensor:
            total = 0.0
            for layer, f in pairs:
                B = layer.lora_B[adapter].weight
                A = layer.lora_A[adapter].weight
                total = total + f.scale**2 * lowrank.proximal_penalty(B, A, f.B, f.A)
            return 0.5 * mu * total

        return penalty

    # ------------------------------------------------------------------ one round
    def sample_clients(self, round_idx: int) -> list[str]:
        rng = np.random.default_rng([self.cfg.seed, round_idx, 7])
        ids = self.data.client_ids
        chosen = rng.choice(len(ids), size=self.cfg.federation.clients_per_round, replace=False)
        return [ids[i] for i in sorted(chosen)]

    def run_round(self, round_idx: int, on_client=None) -> dict:
        t0 = time.perf_counter()
        updates, heads, losses, rejected = [], {}, [], []
        for cid in self.sample_clients(round_idx):
            update, head, loss = self._train_client(cid, round_idx)
            try:
                validate_update(self.global_state, update)
                for k, h in head.items():
                    if not torch.isfinite(h).all():
                        raise AggregationInputError(f"head {k} contains NaN or Inf", client_id=cid)
            except AggregationInputError as err:
                log.warning("round %d: rejected update: %s", round_idx + 1, err)
                rejected.append(cid)
            else:
                updates.append(update)
                heads[cid] = head
                losses.append(loss)
            if on_client is not None:
                on_client()

        record = {"round": round_idx + 1, "method": self.aggregator.name, "clients": [u.client_id for u in updates],
                  "rejected": rejected}
        corrections: dict[str, LowRank] = {}
        if updates:
            result = self.aggregator.aggregate(self.global_state, updates, round_idx)
            corrections = result.corrections
            adapters.fold_corrections(self.layers, corrections)
            self.global_state = result.global_state
            self.global_head = {
                k: sum(result.weights[cid] * heads[cid][k] for cid in heads) for k in self.global_head
            }
            head_bytes = sum(t.numel() * t.element_size() for t in self.global_head.values())
            record.update(
                agg_error=result.error,
                agg_error_max=max(result.errors.values()),
                bytes_up=sum(result.bytes_up.values()) + head_bytes * len(updates),
                bytes_down=sum(result.bytes_down.values()) + head_bytes * len(updates),
                bytes_up_per_client={c: b + head_bytes for c, b in result.bytes_up.items()},
                bytes_down_per_client={c: b + head_bytes for c, b in result.bytes_down.items()},
                train_loss=float(np.mean(losses)),
                weights=result.weights,
            )
        else:
            log.warning("round %d: every update was rejected; the global model is unchanged", round_idx + 1)
        self.corrections.append(corrections)
        self._install_global()
        record.update(self.evaluate([u.client_id for u in updates]))
        record["round_time_s"] = time.perf_counter() - t0
        return record

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, local_clients: list[str] = ()) -> dict:
        """Global model on the dev split, and on the local test splits of ``local_clients``."""
        d = self.data
        logits, loss = predict(self.model, d.dev, np.arange(d.dev_size), self.cfg.eval.batch_size)
        out = {"metric_name": d.metric, "metric": score(d, logits, d.dev["labels"]), "eval_loss": loss}
        if self.cfg.eval.local:
            values = []
            for cid in local_clients:
                idx = d.test_indices[cid]
                if len(idx):
                    lg, _ = predict(self.model, d.train, idx, self.cfg.eval.batch_size)
                    values.append(score(d, lg, d.train["labels"][torch.as_tensor(idx)]))
            out["local_metric"] = float(np.mean(values)) if values else None
        return out

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint(self, round_number: int) -> None:
        factors = {m: s.factors for m, s in self.global_state.items()}
        adapter = checkpoint.adapter_tensors(factors, self.global_head)
        corr = checkpoint.correction_tensors(self.corrections[round_number - 1])
        opt_tensors, opt_meta = _flatten_optimizers(self.optimizer_states)
        state = {
            "round": round_number,
            "method": self.aggregator.name,
            "num_labels": self.data.num_labels,
            "config": self.cfg.to_dict(),
            "metrics": self.records,
            "optimizer_meta": opt_meta,
        }
        checkpoint.save_round(
            self.run_dir, round_number, {"adapter": adapter, "correction": corr, "optimizer": opt_tensors}, state
        )

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None) -> list[dict]:
        """Train the remaining rounds (or up to round ``stop_after``); returns all metric records."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cfg = self.cfg
        last = cfg.federation.rounds if stop_after is None else min(stop_after, cfg.federation.rounds)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter() - (self.records[-1]["wall_time_s"] if self.records else 0.0)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with MetricsWriter(self.run_dir) as writer, Progress(*columns, disable=not self.progress) as bar:
            rounds_task = bar.add_task(f"{self.aggregator.name} rounds", total=last, completed=self.next_round)
            clients_task = bar.add_task("clients", total=cfg.federation.clients_per_round)
            for round_idx in range(self.next_round, last):
                bar.reset(clients_task, total=cfg.federation.clients_per_round)
                record = self.run_round(round_idx, on_client=lambda: bar.advance(clients_task))
                record["wall_time_s"] = time.perf_counter() - t_start
                self.records.append(record)
                writer.write(record)
                self._checkpoint(round_idx + 1)
                self.next_round = round_idx + 1
                bar.advance(rounds_task)
                log.info(
                    "round %d/%d %s=%.4f eval_loss=%.4f agg_error=%.2e",
                    round_idx + 1, cfg.federation.rounds, record["metric_name"], record["metric"],
                    record["eval_loss"], record.get("agg_error", float("nan")),
                )
        return self.records


def _seed(seed: int, round_idx: int, cid: str) -> int:
    return int(np.random.default_rng([seed, round_idx, int(cid), 2]).integers(2**62))


def _flatten_optimizers(states: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW states as flat tensors (safetensors) plus JSON metadata; never pickled."""
    tensors, meta = {}, {}
    for cid, sd in states.items():
        meta[cid] = {"param_groups": sd["param_groups"], "params": []}
        for pid, st in sd["state"].items():
            names = []
            for key, value in st.items():
                tensors[f"{cid}.{pid}.{key}"] = torch.as_tensor(value).clone()
                names.append(key)
            meta[cid]["params"].append([pid, names])
    return tensors, meta


def _unflatten_optimizers(tensors: dict[str, torch.Tensor], state: dict) -> dict[str, dict]:
    out = {}
    for cid, info in state.get("optimizer_meta", {}).items():
        st = {int(pid): {k: tensors[f"{cid}.{pid}.{k}"] for k in names} for pid, names in info["params"]}
        out[cid] = {"state": st, "param_groups": info["param_groups"]}
    return out
