"""The run loop: sample, configure, exchange through a runtime, aggregate, fold, evaluate, record, checkpoint.

The round itself is the protocol's (:class:`~fedlora.protocol.strategy.RoundStrategy`: tasks out, replies
in); the clients train through a runtime (in-process on one shared host model by default); this module
only drives them and keeps the run's state on disk. It writes nothing to the terminal: progress goes to the
``on_event`` callback of :meth:`Simulation.run`, messages to the ``fedlora`` logger.

Everything random is derived from named streams of ``(seed, round, client)`` (:mod:`fedlora.seeds`), so a
run resumed from the checkpoint of round ``t`` replays rounds ``t+1..`` exactly as an uninterrupted run would.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import adapters, checkpoint, seeds
from ..aggregators import AGGREGATORS, Aggregator, get_aggregator, method_options
from ..config import RunConfig, TrainConfig
from ..data import primary_score, score_name
from ..protocol import CorrectionHistory, TrainSettings
from ..protocol.hierfedlora import HierFedLoRA
from ..protocol.runtime import Runtime
from ..protocol.strategy import RoundResult, RoundStrategy
from ..runlog import HIER_FILE, MetricsWriter, append_jsonl, keep_jsonl_through
from ..types import LowRank, ModuleState
from .client import ClientData, predict
from .clock import Clock, client_ranks, mean_lengths
from .data import FederatedData, build_federated_data, metric_values, score
from .dp import calibrated_rounds, check_privacy, client_dp, poisson_clients, privacy_ledger
from .generation import evaluate_generation
from .hierarchy import build_hierarchy, hier_options
from .host import ModelHost
from .runtimes import InProcessRuntime

log = logging.getLogger("fedlora")
class Simulation:
    """Run a federated experiment described by a :class:`~fedlora.config.RunConfig`.

    ``Simulation(cfg).run()`` trains all rounds; ``Simulation.resume(run_dir).run()`` continues the newest
    intact checkpoint of ``run_dir``. ``runtime`` is the runtime class (``InProcessRuntime`` or the
    serialising stand-in ``SerializingRuntime``), or any callable ``runtime(host, clients) -> Runtime``: it
    gets the host model and each client's data (a remote runtime such as Flower's ignores both).
    """

    def __init__(self, cfg: RunConfig, *, runtime: Callable[..., Runtime] = InProcessRuntime):
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.method = cfg.federation.method
        self.aggregator: Aggregator = self.check(cfg)  # method and model fail before any data is read
        self.skipped: list[str] = []
        self.data: FederatedData = build_federated_data(cfg, self.run_dir)
        base, self.tokenizer = adapters.load_base_model(cfg.model, self.data.num_labels, cfg.seed)
        self.data.encode(self.tokenizer, cfg.model.max_length)
        model = adapters.attach_lora(base, cfg.lora, cfg.model.task_type, cfg.train.gradient_checkpointing)
        ids = self.data.client_ids
        layers = adapters.lora_layers(model)
        self.clock = Clock(cfg, model, ids, mean_lengths(self.data.train, self.data.train_indices), list(layers))
        self.client_ranks = client_ranks(cfg, ids, self.clock.profiles)
        self.host = ModelHost(model, cfg.lora, cfg.model.task_type, self.client_ranks.values())
        self.clients = {
            cid: ClientData(self.data.train, self.data.train_indices[cid], self.data.histograms[cid]) for cid in ids
        }
        self.runtime = runtime(self.host, self.clients)
        head = {k: p.detach().clone() for k, p in self.host.heads().items()}
        bound = cfg.privacy.bound_factor
        self.ledger = privacy_ledger(cfg, self.aggregator, train_settings(cfg.train),
                                     {c: len(d.indices) for c, d in self.clients.items()})
        self.client_dp = client_dp(cfg, self.client_ranks)
        kwargs = dict(train=train_settings(cfg.train), ranks=self.client_ranks, seed=cfg.seed,
                      history=CorrectionHistory(load=self._corrections_of),
                      update_bound=(bound, cfg.privacy.bound_mode) if bound is not None else None,
                      privacy=self.ledger.settings if self.ledger is not None else None, client_dp=self.client_dp,
                      error_measure=cfg.federation.error_measure, lr_schedule=cfg.train.lr_schedule,
                      rounds=cfg.federation.rounds)
        if self.method == HierFedLoRA.name:
            self.strategy = build_hierarchy(hier_options(cfg.federation.method_options), self.clock,
                                            self.data.histograms, self.host.read_state(), head, **kwargs)
        else:
            self.strategy = RoundStrategy(self.aggregator, self.host.read_state(), head, **kwargs)
        self.records: list[dict] = []
        self.next_round = 0
        self._round_corrections: dict[str, LowRank] = {}

    @staticmethod
    def check(cfg: RunConfig) -> Aggregator:
        """The run's aggregator (HierFedLoRA: its rule inside groups), after checking the method's options and
        that the model can be found (one-line errors).

        A method with a ``seed`` option (FLoRA's fresh factors) follows the run's seed unless it is given.
        """
        method, options = cfg.federation.method, dict(cfg.federation.method_options)
        try:
            if method == HierFedLoRA.name:
                hier = hier_options(options)
                if hier.groups > cfg.partition.num_clients:
                    raise ValueError(f"hierfedlora: groups={hier.groups} exceeds partition.num_clients="
                                     f"{cfg.partition.num_clients}")
                aggregator = hier.rules(cfg.seed)[0]
            else:
                if method in AGGREGATORS and "seed" in method_options(method) and "seed" not in options:
                    options["seed"] = cfg.seed
                aggregator = get_aggregator(method, **options)
        except ValueError as err:
            known = method in AGGREGATORS or method == HierFedLoRA.name
            raise ValueError(f"{'federation.method_options' if known else 'federation.method'}: {err}") from None
        check_privacy(cfg, aggregator, train_settings(cfg.train))
        adapters.check_model(cfg.model)
        return aggregator

    # ------------------------------------------------------------------ views
    @property
    def model(self):
        return self.host.model

    @property
    def layers(self):
        return self.host.layers

    @property
    def global_state(self) -> dict[str, ModuleState]:
        return self.strategy.global_state

    @property
    def global_head(self) -> dict[str, torch.Tensor]:
        return self.strategy.head

    @property
    def optimizer_states(self) -> dict[str, dict]:
        """The AdamW states clients keep between rounds (``train.optimizer_state=kept``), by client."""
        return {cid: c.optimizer_state for cid, c in self.clients.items() if c.optimizer_state is not None}

    @property
    def corrections(self) -> list[dict[str, LowRank]]:
        """Each round's corrections, in order (read from the checkpoints)."""
        return [self.strategy.history.get(r) for r in range(1, self.strategy.history.latest + 1)]

    def _corrections_of(self, round_number: int) -> dict[str, LowRank]:
        return checkpoint.load_round_corrections(self.run_dir, round_number)

    # ------------------------------------------------------------------ resume
    @classmethod
    def resume(cls, run_dir: str | Path, *, rounds: int | None = None, **kwargs) -> Simulation:
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
            fixed = calibrated_rounds(raw)
            if fixed is not None and rounds != fixed:
                raise ConfigError(f"federation.rounds={rounds}: {run_dir} calibrated its DP noise to a target epsilon "
                                  f"over {fixed} rounds; it cannot be extended")
            schedule = raw.get("train", {}).get("lr_schedule", "constant")
            if schedule != "constant" and rounds != raw.get("federation", {}).get("rounds"):
                raise ConfigError(f"federation.rounds={rounds}: {run_dir} decays its learning rate over its own "
                                  f"rounds (train.lr_schedule={schedule}); it cannot be extended")
            raw = {**raw, "federation": {**raw.get("federation", {}), "rounds": rounds}}
        cfg = config_from_dict(raw)
        cfg.output_dir = str(run_dir)
        sim = cls(cfg, **kwargs)
        for line in found.skipped:
            log.warning("%s", line)
        sim.skipped = found.skipped
        sim._restore(state)
        return sim

    def _restore(self, state: dict) -> None:
        completed = int(state["round"])
        checkpoint.remove_rounds_after(self.run_dir, completed)
        for r in range(1, completed + 1):  # replay every fold in order: bit-identical base weights
            self.host.fold(self._corrections_of(r))
        folder = checkpoint.round_dir(self.run_dir, completed)
        scales = {m: st.factors.scale for m, st in self.global_state.items()}
        factors, head = checkpoint.load_adapter(folder, scales, self.global_head)
        strategy = self.strategy
        strategy.global_state = {m: ModuleState(f, strategy.global_state[m].layout) for m, f in factors.items()}
        strategy.head = head
        strategy.history = CorrectionHistory(load=self._corrections_of, latest=completed)
        strategy.load_state(state.get("strategy", {"synced": state.get("synced", {})}))
        self.clock.load_state(state.get("clock", {}))
        if self.ledger is not None:
            self.ledger.load_state(state.get("privacy", {}))
        for cid, opt in checkpoint.unflatten_optimizers(checkpoint.load_tensors(folder, "optimizer"), state).items():
            self.clients[cid].optimizer_state = opt
        self.records = list(state["metrics"])
        self.next_round = completed
        self.host.install_global(strategy.global_state, strategy.head)
        with MetricsWriter(self.run_dir, tensorboard=False) as writer:
            writer.truncate_after(completed)
        keep_jsonl_through(self.run_dir / HIER_FILE, completed)
        if hasattr(strategy, "events"):  # the grouping at the start is logged already
            strategy.events.clear()
        log.info("resumed %s after round %d", self.run_dir, completed)

    # ------------------------------------------------------------------ one round
    def sample_clients(self, round_idx: int) -> list[str]:
        rng = seeds.rng([self.cfg.seed, round_idx], "sampling")
        ids = self.data.client_ids
        if self.client_dp is not None:
            return poisson_clients(ids, self.client_dp.sample_rate, rng)
        chosen = rng.choice(len(ids), size=self.cfg.federation.clients_per_round, replace=False)
        return [ids[i] for i in sorted(chosen)]

    def run_round(self, round_idx: int, on_client: Callable[[str], None] | None = None) -> dict:
        """One global round: the strategy's exchanges (one, or HierFedLoRA's group rounds), then fold, evaluate."""
        t0 = time.perf_counter()
        clients = self.sample_clients(round_idx)
        times, header_bytes, wire, stragglers, rejected = [], {}, {}, [], {}
        bytes_up: dict[str, int] = {}
        bytes_down: dict[str, int] = {}
        phase_s = {"exchange": 0.0, "aggregate": 0.0}  # measured wall-clock, beside the simulated sim_round_s
        self.strategy.resync(self.runtime.client_versions(clients))
        for step in range(self.strategy.exchanges_per_round):
            tasks = self.strategy.configure_train(round_idx, clients, step=step)
            t_phase = time.perf_counter()
            exchange = self.runtime.exchange(tasks, on_reply=on_client)
            phase_s["exchange"] += time.perf_counter() - t_phase
            exchange_times = self._times(round_idx, tasks, exchange)
            late = self.clock.stragglers(exchange_times)
            for cid, why in late.items():
                exchange.failed.setdefault(cid, why)
                exchange.replies.pop(cid, None)
            stragglers += [cid for cid in late if cid not in stragglers]
            t_phase = time.perf_counter()
            result = self.strategy.aggregate_train(round_idx, tasks, exchange.replies, exchange.failed, step=step)
            phase_s["aggregate"] += time.perf_counter() - t_phase
            rejected.update(result.rejected)  # a client rejected in any exchange of the round
            times.append(exchange_times)
            for total, part in ((bytes_up, result.bytes_up), (bytes_down, result.bytes_down),
                                (header_bytes, exchange.header_bytes), (wire, exchange.wire_tensor_bytes)):
                for cid, n in part.items():
                    total[cid] = total.get(cid, 0) + n
        result.bytes_up, result.bytes_down, result.rejected = bytes_up, bytes_down, rejected
        for cid, why in result.rejected.items():
            if cid in stragglers:
                log.info("round %d: client %s dropped: %s", round_idx + 1, cid, why)
            else:
                log.warning("round %d: rejected update: %s", round_idx + 1, why)
        if not result.clients:
            log.warning("round %d: %s", round_idx + 1, "every update was rejected; the global model is unchanged"
                        if clients else "no client was sampled")
        self.host.fold(result.corrections)
        self._round_corrections = result.corrections  # written by the round's checkpoint
        self.host.install_global(result.global_state, result.head)
        record = _record(self.method, result, header_bytes)
        if self.cfg.train.lr_schedule != "constant":
            record["lr"] = self.strategy.lr_at(round_idx)
        if wire:
            record["wire_tensor_bytes"] = sum(wire.values())
        lanes = {cid: self.strategy.lane_of(cid) for cid in clients}
        record["sim_round_s"] = self.clock.round_time(times, lanes)
        record["stragglers"] = stragglers
        if self.ledger is not None:  # every sampled client may have trained: all of them spend
            record["epsilon"] = self.ledger.charge(clients)
            record["epsilon_max"], record["dp_delta"] = max(record["epsilon"].values(), default=0.0), self.ledger.delta
        if self.client_dp is not None:
            record["client_epsilon"], record["client_delta"] = (self.client_dp.epsilon(round_idx + 1),
                                                                self.client_dp.delta)
        t_phase = time.perf_counter()
        record.update(self.evaluate(result.clients, round_idx + 1))
        record["phase_s"] = {**phase_s, "evaluate": time.perf_counter() - t_phase}
        record["round_time_s"] = time.perf_counter() - t0
        return record

    def _times(self, round_idx: int, tasks, exchange) -> dict:
        """Each client's simulated time in one exchange (its reply's bytes, or none when it failed)."""
        from ..protocol import reply_tensor_bytes, task_tensor_bytes

        return {
            cid: self.clock.client_time(
                round_idx, task, len(self.clients[cid].indices), task_tensor_bytes(task),
                reply_tensor_bytes(exchange.replies[cid]) if cid in exchange.replies else 0,
            )
            for cid, task in tasks.items()
        }

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, local_clients: list[str] = (), round_number: int = 0) -> dict:
        """Global model on the dev split, and on the local test splits of ``local_clients``."""
        d = self.data
        logits, loss = predict(self.model, d.dev, np.arange(d.dev_size), self.cfg.eval.batch_size)
        values = metric_values(d, logits, d.dev["labels"])
        out = {"metric_name": score_name(values), "metric": primary_score(values), "eval_loss": loss}
        if d.dev_prompts:  # causal LM: exact match and ROUGE-L of greedy answers too
            values = {**values, **evaluate_generation(self.model, self.tokenizer, d, self.cfg.eval, self.run_dir,
                                                      round_number)}
        out["metrics"] = values
        if self.cfg.eval.local:
            values = []
            for cid in local_clients:
                idx = d.test_indices[cid]
                if len(idx):
                    lg, _ = predict(self.model, d.train, idx, self.cfg.eval.batch_size)
                    values.append(score(d, lg, d.train["labels"][torch.as_tensor(idx)]))
            out["local_metric"] = float(np.mean(values)) if values else None
        return out

    def _log_events(self, round_idx: int) -> None:
        """HierFedLoRA's groupings and plans, appended to ``hier.jsonl`` as they change."""
        events = getattr(self.strategy, "events", None)
        if events:
            append_jsonl(self.run_dir / HIER_FILE, events)
            events.clear()

    # ------------------------------------------------------------------ checkpoint
    def _checkpoint(self, round_number: int) -> None:
        factors = {m: s.factors for m, s in self.global_state.items()}
        adapter = checkpoint.adapter_tensors(factors, self.global_head)
        corr = checkpoint.correction_tensors(self._round_corrections)
        opt_tensors, opt_meta = checkpoint.flatten_optimizers(self.optimizer_states)
        state = {
            "round": round_number,
            "method": self.aggregator.name,
            "num_labels": self.data.num_labels,
            "config": self.cfg.to_dict(),
            "metrics": self.records,
            "optimizer_meta": opt_meta,
            "synced": self.strategy.synced,
            "strategy": self.strategy.state(),
            "clock": self.clock.state(),
            "privacy": self.ledger.state() if self.ledger is not None else {},
        }
        checkpoint.save_round(
            self.run_dir, round_number, {"adapter": adapter, "correction": corr, "optimizer": opt_tensors}, state
        )

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None, on_event: Callable[..., None] | None = None) -> list[dict]:
        """Train the remaining rounds (or up to round ``stop_after``); returns all metric records.

        ``on_event(kind, **info)`` hears ``"start"`` (``total``, ``done``, ``clients_per_round``),
        ``"client"`` (``round``, ``client``) and ``"round"`` (``record``), e.g. to draw progress bars.
        """
        cfg = self.cfg
        emit = on_event or (lambda kind, **info: None)
        last = cfg.federation.rounds if stop_after is None else min(stop_after, cfg.federation.rounds)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter() - (self.records[-1]["wall_time_s"] if self.records else 0.0)
        emit("start", total=last, done=self.next_round, clients_per_round=cfg.federation.clients_per_round)
        with MetricsWriter(self.run_dir) as writer:
            for round_idx in range(self.next_round, last):
                record = self.run_round(round_idx,
                                        on_client=lambda cid, r=round_idx: emit("client", round=r + 1, client=cid))
                record["wall_time_s"] = time.perf_counter() - t_start
                record["sim_time_s"] = record["sim_round_s"] + (self.records[-1]["sim_time_s"] if self.records else 0.0)
                self._log_events(round_idx)
                self.records.append(record)
                writer.write(record)
                self._checkpoint(round_idx + 1)
                self.next_round = round_idx + 1
                emit("round", record=record)
                log.info(
                    "round %d/%d %s=%.4f eval_loss=%.4f agg_error=%.2e",
                    round_idx + 1, cfg.federation.rounds, record["metric_name"], record["metric"],
                    record["eval_loss"], record.get("agg_error", float("nan")),
                )
        return self.records


def train_settings(train: TrainConfig) -> TrainSettings:
    """The protocol's training settings from the run config."""
    return TrainSettings(
        local_steps=train.local_steps, local_epochs=train.local_epochs, batch_size=train.batch_size, lr=train.lr,
        weight_decay=train.weight_decay, warmup_steps=train.warmup_steps, max_grad_norm=train.max_grad_norm,
        optimizer_state=train.optimizer_state, bf16=train.bf16,
    )


def _record(method: str, result: RoundResult, header_bytes: dict[str, int]) -> dict:
    """The metrics record of one round, before evaluation."""
    record = {"round": result.round, "method": method, "clients": result.clients, "rejected": list(result.rejected)}
    if result.ranks:
        record["client_ranks"] = result.ranks
    if result.rank_energy is not None:
        record["rank_energy"] = result.rank_energy
    for key in ("inner_error", "groups", "clipped"):
        if result.info.get(key) is not None:
            record[key] = result.info[key]
    if result.clients:
        record.update(
            agg_error=result.error,
            agg_error_max=max(result.errors.values()),
            bytes_up=sum(result.bytes_up.values()),
            bytes_down=sum(result.bytes_down.values()),
            bytes_up_per_client=result.bytes_up,
            bytes_down_per_client=result.bytes_down,
            train_loss=result.train_loss,
            weights=result.weights,
        )
    if header_bytes:
        record["header_bytes"] = sum(header_bytes.values())
    return record

