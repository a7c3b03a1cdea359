"""Experiment configuration: YAML plus dotted command-line overrides, validated by pydantic.

``load_config(path, ["federation.rounds=3", "lora.rank=4"])`` returns a :class:`RunConfig`; any mistake
raises :class:`ConfigError` with one line naming the key (``federation.rounds: must be >= 1``).
``partition.options`` is checked against the chosen scheme's own signature (names, types, defaults: see
:func:`fedlora.partition.partition_options`), as ``federation.method_options`` is against the method's.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .devices import DEFAULT_CLASSES
from .partition import PARTITIONERS, partition_option_types, partition_options


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    name: str = Field("minilm", description="HF model id or local folder; 'minilm' = the offline all-MiniLM-L6-v2")
    task_type: Literal["seq_cls", "causal_lm"] = Field(
        "seq_cls", description="seq_cls: classification or regression head; causal_lm: instruction tuning"
    )
    max_length: int = Field(64, ge=8, le=8192, description="tokens per example")


class LoraSection(_Section):
    rank: int = Field(8, ge=1, description="global LoRA rank r (the largest client rank)")
    alpha: float = Field(16.0, gt=0, description="scale s = alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA branch's input (lora_dropout)")
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "value"], description="names of the linear layers that get adapters, "
        "or the presets attention and mlp (by model family: fedlora.adapters.TARGET_PRESETS)"
    )
    modules_to_save: list[str] = Field(
        default_factory=list, description="whole modules trained beside the adapters and averaged like the "
        "classification head (PEFT's modules_to_save), e.g. [pooler] for BERT's pooler; the head is always in"
    )
    client_ranks: list[int] | dict[str, int] | None = Field(
        None, description="heterogeneous ranks: a list cycled over clients, or a mapping device class -> rank "
        "(devices.classes); None: every client has rank"
    )

    @model_validator(mode="after")
    def _ranks(self):
        values = self.client_ranks.values() if isinstance(self.client_ranks, dict) else self.client_ranks or []
        if any(not 1 <= r <= self.rank for r in values):
            raise ValueError(f"client_ranks must lie in 1..rank ({self.rank}), got {self.client_ranks}")
        return self


class DataConfig(_Section):
    task: str = Field("sst2", description="GLUE task, agnews, a local file path, or hub:owner/name")
    data_dir: str | None = Field(None, description="offline data folder; default $FEDLORA_DATA_DIR")
    dev: str | None = Field(None, description="dev split source for a local file (default: 10% of it)")
    text_column: str | None = Field(
        None, description="text column of a file or hub dataset (causal_lm: the prompt; default 'prompt')"
    )
    text_pair_column: str | None = Field(
        None, description="second text column of sentence pairs (causal_lm: the response; default 'response')"
    )
    label_column: str | None = Field(None, description="label column of a file or hub dataset")
    max_train_examples: int | None = Field(20000, ge=1, description="subsample of the train split (seeded)")
    max_eval_examples: int | None = Field(None, ge=1, description="subsample of the dev split; None: all")
    prompt_template: Literal["auto", "chat", "plain", "none"] = Field(
        "auto", description="causal_lm: chat (the tokenizer's chat template), plain ('### Instruction:' ... "
        "'### Response:'), none (the prompt verbatim) or auto (chat if the tokenizer has one, else plain)")
    validation_fraction: float | None = Field(
        None, gt=0, lt=1, description="evaluate on this seeded fraction of the training data, held out from "
        "every client, instead of the dev split (to choose hyperparameters without the dev set); None: dev")


def _scheme_summary() -> str:
    return "; ".join(
        f"{name}: " + (", ".join(f"{k}={v!r}" for k, v in partition_options(name).items()) or "none")
        for name in sorted(PARTITIONERS)
    )


@lru_cache(maxsize=None)
def _options_model(scheme: str) -> type[BaseModel]:
    """A pydantic model of ``scheme``'s options: the partitioner's own annotations and defaults."""
    defaults = partition_options(scheme)
    fields = {name: (hint, defaults[name]) for name, hint in partition_option_types(scheme).items()}
    return create_model(f"{scheme}_options", __config__=ConfigDict(extra="forbid"), **fields)


def _key_error(key: str, value: Any, kind: str, message: str) -> ValidationError:
    """A validation error located at ``key`` below the field being validated."""
    detail = InitErrorDetails(type=PydanticCustomError(kind, message), loc=(key,), input=value)
    return ValidationError.from_exception_data("PartitionConfig", [detail])


class PartitionConfig(_Section):
    scheme: str = Field(
        "dirichlet", description=f"how examples are split among clients: {', '.join(sorted(PARTITIONERS))}"
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        validate_default=True,
        description="the scheme's keyword options, checked against its signature (fedlora.partition."
        f"partition_options); unset ones take its defaults ({_scheme_summary()})",
    )
    num_clients: int = Field(8, ge=1, description="number of clients K the training split is divided among")
    local_test_fraction: float = Field(0.1, ge=0, lt=1, description="share of each client's data kept for its test")

    @model_validator(mode="before")
    @classmethod
    def _flat_options(cls, raw):
        # Scheme options used to be flat keys (partition.alpha); say where they go now.
        if isinstance(raw, dict):
            for key in raw:
                if key not in cls.model_fields and any(key in partition_options(s) for s in PARTITIONERS):
                    raise _key_error(key, raw[key], "moved_option",
                                     f"unknown key; scheme options go under partition.options "
                                     f"(partition.options.{key})")
        return raw

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, scheme: str) -> str:
        if scheme not in PARTITIONERS:
            raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(sorted(PARTITIONERS))}")
        return scheme

    @field_validator("options")
    @classmethod
    def _scheme_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        scheme = info.data.get("scheme")
        if scheme is None:  # the scheme itself is bad, and that is the error reported
            return options
        valid = partition_options(scheme)
        for key, value in options.items():
            if key not in valid:
                listed = ", ".join(valid) or "none"
                raise _key_error(key, value, "unknown_option",
                                 f"unknown option of scheme {scheme!r}; valid options: {listed}")
        # Every option spelled out, defaults included: the saved config records the partition exactly.
        return _options_model(scheme).model_validate(options).model_dump()


class FederationConfig(_Section):
    method: str = Field("hexa", description="aggregation method (see `fedlora methods`)")
    method_options: dict[str, Any] = Field(default_factory=dict, description="keyword options of the method")
    rounds: int = Field(5, ge=1, description="federated rounds (one aggregation each)")
    clients_per_round: int = Field(4, ge=1, description="clients sampled (seeded) to train in each round")
    error_measure: Literal["exact", "core"] = Field(
        "exact", description="aggregation error: exact (float64 from the factors) or core (from the small SVD "
        "core where the method allows; about the truncation's cost on large models)"
    )


class DeviceClass(_Section):
    speed: float = Field(gt=0, description="FLOP/s of local training")
    up: float = Field(gt=0, description="uplink bytes/s")
    down: float = Field(gt=0, description="downlink bytes/s")
    memory: float = Field(gt=0, description="bytes available for training")
    jitter: float = Field(0.0, ge=0, description="sigma of a lognormal factor on speed per round and client")


def _default_classes() -> dict[str, DeviceClass]:
    return {name: DeviceClass(speed=p.speed, up=p.up, down=p.down, memory=p.memory, jitter=p.jitter)
            for name, p in DEFAULT_CLASSES.items()}


class DevicesConfig(_Section):
    classes: dict[str, DeviceClass] = Field(
        default_factory=_default_classes, description="named device classes (speed, bandwidth, memory)"
    )
    proportions: dict[str, float] = Field(
        default_factory=lambda: {next(iter(DEFAULT_CLASSES)): 1.0},
        description="share of clients in each class (seeded assignment; normalised)",
    )
    assignment: list[str] | None = Field(
        None, description="instead of proportions: the class of each client, cycled over clients"
    )
    deadline_s: float | None = Field(
        None, gt=0, description="simulated seconds a round waits; slower clients are dropped (stragglers)"
    )

    @model_validator(mode="after")
    def _known_classes(self):
        for where, names in (("proportions", list(self.proportions)), ("assignment", self.assignment or [])):
            unknown = [n for n in names if n not in self.classes]
            if unknown:
                raise ValueError(f"{where}: unknown device class {unknown[0]!r}; classes: {', '.join(self.classes)}")
        if any(v < 0 for v in self.proportions.values()) or not sum(self.proportions.values()) > 0:
            raise ValueError(f"proportions must be >= 0 with a positive sum, got {self.proportions}")
        return self


class TrainConfig(_Section):
    local_steps: int | None = Field(30, ge=1, description="optimizer steps per client per round")
    local_epochs: float | None = Field(None, gt=0, description="instead of local_steps: passes over local data")
    batch_size: int = Field(16, ge=1, description="examples per local optimizer step")
    lr: float = Field(5e-3, gt=0, description="AdamW learning rate of the local steps")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="the rate across rounds: constant, or from lr in round 1 decayed linearly or by a "
        "cosine towards 0 after the last round (fedlora.protocol.schedule)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warmup steps of each local run")
    optimizer_state: Literal["fresh", "kept"] = Field("fresh", description="fresh AdamW each round, or kept")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient norm clip; None: no clipping")
    bf16: bool = Field(False, description="forward passes under bfloat16 autocast on the CPU (weights stay float32)")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass (less memory, more time; larger models)")

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(64, ge=1, description="examples per forward pass when evaluating")
    local: bool = Field(True, description="also evaluate the global model on the sampled clients' local test splits")
    target: float | None = Field(
        None, description="metric value whose first reach is reported in simulated time, bytes and rounds"
    )
    generate_examples: int = Field(
        32, ge=0, description="causal_lm: dev prompts answered greedily each evaluation for exact match and "
        "ROUGE-L (0: perplexity only)")
    max_new_tokens: int = Field(32, ge=1, description="causal_lm: longest generated answer, in tokens")
    samples: int = Field(5, ge=0, description="causal_lm: answers written to generations/round_NNNN.jsonl")


class PrivacySection(_Section):
    target_epsilon: float | None = Field(
        None, gt=0, description="sample-level DP-SGD (Opacus) on every client: epsilon each client may spend over "
        "the whole run; None: off")
    delta: float | None = Field(None, gt=0, lt=1, description="DP delta; default 1/(10 n) of the smallest "
                                "client's n examples; must be below 1/n")
    clip: float = Field(1.0, gt=0, description="DP-SGD: per-example gradient norm bound")
    accountant: Literal["rdp", "prv"] = Field("rdp", description="Opacus accountant that turns noise into epsilon")
    client_epsilon: float | None = Field(
        None, gt=0, description="client-level DP at the server (fra with fold_tail only): epsilon the whole run may "
        "spend on any one client's participation; clients are then sampled by Poisson sampling; None: off")
    client_noise_multiplier: float | None = Field(
        None, ge=0, description="client-level DP with this noise multiplier z instead of a target epsilon (0: no "
        "noise, a check)")
    client_clip: float = Field(1.0, gt=0, description="client-level DP: bound C on each client's update norm "
                               "||s(BA - B0A0)|| together with its head's change")
    client_delta: float | None = Field(None, gt=0, lt=1, description="client-level DP delta; default 1/(10 N) for "
                                       "N = partition.num_clients; must be below 1/N")
    bound_factor: float | None = Field(
        None, ge=1, description="guard without DP: an update whose norm ||s(BA - B0A0)|| is above this many "
        "times the round's median is clipped or rejected; None: off")
    bound_mode: Literal["clip", "reject"] = Field("clip", description="what bound_factor does to such an update")


class FlowerSection(_Section):
    round_timeout_s: float | None = Field(
        None, gt=0, description="Flower: seconds the server waits for an exchange's replies; None: until every "
        "node has answered or Flower reported it lost")
    node_wait_s: float = Field(120.0, gt=0, description="Flower: seconds the server waits for the nodes to connect")


class RunConfig(_Section):
    seed: int = Field(0, description="seed of everything random: subsample, partition, sampling, training")
    output_dir: str = Field("runs/default", description="run folder: metrics, plots, checkpoints")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the pretrained model")
    lora: LoraSection = Field(default_factory=LoraSection, description="the LoRA adapters")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset and its splits")
    partition: PartitionConfig = Field(default_factory=PartitionConfig, description="who gets which data")
    federation: FederationConfig = Field(
        default_factory=FederationConfig, description="the aggregation method, its options and the rounds"
    )
    devices: DevicesConfig = Field(
        default_factory=DevicesConfig, description="client devices: speed, bandwidth, memory (simulated time)"
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="each client's local training")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="evaluation after each round")
    privacy: PrivacySection = Field(default_factory=PrivacySection,
                                    description="differential privacy and bounds on client updates")
    flower: FlowerSection = Field(default_factory=FlowerSection,
                                  description="the Flower runtime (run --engine flower, deploy)")

    @model_validator(mode="after")
    def _federation(self):
        if self.federation.clients_per_round > self.partition.num_clients:
            raise ValueError(
                f"federation.clients_per_round ({self.federation.clients_per_round}) exceeds "
                f"partition.num_clients ({self.partition.num_clients})"
            )
        if isinstance(self.lora.client_ranks, dict):
            unknown = [n for n in self.lora.client_ranks if n not in self.devices.classes]
            if unknown:
                raise ValueError(f"lora.client_ranks: unknown device class {unknown[0]!r}; "
                                 f"classes: {', '.join(self.devices.classes)}")
        return self

    def to_dict(self) -> dict:
        return json.loads(self.model_dump_json())


def _parse_value(text: str) -> Any:
    # YAML scalars: 3 -> int, 1e-3 -> float, true -> bool, [a, b] -> list, null -> None.
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (values parsed as YAML)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        try:
            node[parts[-1]] = _parse_value(value)
        except yaml.YAMLError as err:  # e.g. "[a]b": a list followed by text
            problem = getattr(err, "problem", None) or "not valid YAML"
            raise ConfigError(f"{key}: cannot read {value!r} as a value ({problem}); quote it to pass it as "
                              f"text: {key}='\"{value}\"'") from None
    return raw


def _known_keys(loc: tuple) -> str:
    """``; did you mean rank? (lora keys: rank, alpha, ...)`` for an unknown key at ``loc``, where the
    section it sits in is a fixed set of fields (not a free mapping such as method options)."""
    import difflib

    model: Any = RunConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        model = field.annotation if field is not None else None
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return ""
    keys = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.5)
    where = f"{'.'.join(map(str, loc[:-1]))} keys" if len(loc) > 1 else "top-level keys"
    return (f"; did you mean {close[0]}?" if close else "") + f" ({where}: {', '.join(keys)})"


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + _known_keys(first["loc"])
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{key}: {msg}{more}"


def config_from_dict(raw: dict) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from defaults), apply dotted overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    return config_from_dict(apply_overrides(raw, overrides or []))
