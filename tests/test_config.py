"""Config: every field described; partition options checked against the scheme's own signature."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel

from fedlora.config import ConfigError, RunConfig, config_from_dict, load_config
from fedlora.partition import PARTITIONERS, partition_option_types, partition_options


def sections(model: type[BaseModel] = RunConfig, prefix: str = ""):
    """``(dotted name, model)`` of RunConfig and every section below it."""
    yield prefix or "RunConfig", model
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from sections(field.annotation, f"{prefix}{name}.")


def config_error(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- descriptions

@pytest.mark.parametrize(("where", "model"), list(sections()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_is_described(where, model):
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{where}: fields without a description: {missing}"


def test_sections_are_all_walked():
    assert {name for name, _ in sections()} == {
        "RunConfig", "model.", "lora.", "data.", "partition.", "federation.", "devices.", "train.", "eval.", "privacy.",
        "flower.",
    }


# ---------------------------------------------------------------- partition options

@pytest.mark.parametrize("scheme", sorted(PARTITIONERS))
def test_partition_options_match_the_signature(scheme):
    params = list(inspect.signature(PARTITIONERS[scheme]).parameters.values())
    assert [p.name for p in params[:3]] == ["labels", "num_clients", "seed"]
    assert partition_options(scheme) == {p.name: p.default for p in params[3:]}
    assert list(partition_option_types(scheme)) == list(partition_options(scheme))
    # the config fills in exactly these defaults
    assert load_config(None, [f"partition.scheme={scheme}"]).partition.options == partition_options(scheme)


def test_default_partition_is_dirichlet_0_3():
    part = load_config().partition
    assert (part.scheme, part.num_clients) == ("dirichlet", 8)
    assert part.options == {"alpha": 0.3, "min_partition_size": 1, "self_balancing": False}


def test_options_are_typed_and_spelled_out():
    part = load_config(None, ["partition.scheme=quantity_skew", "partition.options.beta=2"]).partition
    assert part.options == {"beta": 2.0, "exponent": None, "min_partition_size": 1}
    assert isinstance(part.options["beta"], float)
    overrides = ["partition.scheme=pathological", "partition.options.class_assignment=random"]
    part = load_config(None, overrides).partition
    assert part.options == {"classes_per_client": 2, "class_assignment": "random"}


def test_options_survive_the_saved_config():
    cfg = load_config(None, ["partition.scheme=imbalanced", "partition.options.dominant_fraction=0.7"])
    again = config_from_dict(cfg.to_dict())  # what resume and export read back from state.json
    assert again.partition == cfg.partition


def test_unknown_scheme_is_one_line_listing_the_schemes():
    message = config_error(["partition.scheme=shards"])
    assert message.startswith("partition.scheme: unknown scheme 'shards'")
    assert all(name in message for name in PARTITIONERS)


@pytest.mark.parametrize(("overrides", "key", "valid"), [
    (["partition.options.beta=0.1"], "partition.options.beta", "alpha, min_partition_size, self_balancing"),
    (["partition.scheme=iid", "partition.options.alpha=0.3"], "partition.options.alpha", "none"),
    (["partition.scheme=imbalanced", "partition.options.classes_per_client=2"],
     "partition.options.classes_per_client", "dominant_fraction, client_size"),
])
def test_unknown_option_is_one_line_naming_it(overrides, key, valid):
    message = config_error(overrides)
    assert message.startswith(f"{key}: unknown option of scheme")
    assert message.endswith(f"valid options: {valid}")


@pytest.mark.parametrize(("overrides", "key"), [
    (["partition.options.alpha=strong"], "partition.options.alpha"),
    (["partition.options.self_balancing=sometimes"], "partition.options.self_balancing"),
    (["partition.options.min_partition_size=1.5"], "partition.options.min_partition_size"),
    (["partition.scheme=pathological", "partition.options.class_assignment=greedy"],
     "partition.options.class_assignment"),
    (["partition.scheme=imbalanced", "partition.options.client_size=[1, 2]"],
     "partition.options.client_size"),
])
def test_wrong_option_type_is_one_line_naming_it(overrides, key):
    assert config_error(overrides).startswith(f"{key}: Input should be")


def test_flat_option_keys_point_to_options():
    message = config_error(["partition.alpha=0.5"])
    assert message == ("partition.alpha: unknown key; scheme options go under partition.options "
                       "(partition.options.alpha)")
    nonsense = config_error(["partition.nonsense=1"])
    assert nonsense.startswith("partition.nonsense: unknown key (partition keys: ") and "num_clients" in nonsense


@pytest.mark.parametrize(("override", "start", "listed"), [
    ("federation.roundz=3", "federation.roundz: unknown key; did you mean rounds? (federation keys: ",
     "clients_per_round"),
    ("train.lr_schedul=linear", "train.lr_schedul: unknown key; did you mean lr_schedule? (train keys: ", "bf16"),
    ("lorra.rank=4", "lorra: unknown key; did you mean lora? (top-level keys: ", "federation"),
    ("lora.r=4", "lora.r: unknown key (lora keys: ", "rank"),  # nothing close enough: the keys only
])
def test_an_unknown_key_names_the_closest_and_lists_its_section(override, start, listed):
    message = config_error([override])
    assert message.startswith(start) and listed in message, message


def test_a_newly_registered_scheme_is_accepted(monkeypatch):
    def toy(labels, num_clients: int, seed: int = 42, shards: int = 2, tag: str | None = None):
        return []

    monkeypatch.setitem(PARTITIONERS, "toy_config_scheme", toy)
    part = load_config(None, ["partition.scheme=toy_config_scheme", "partition.options.shards=3"]).partition
    assert part.options == {"shards": 3, "tag": None}
    assert config_error(["partition.scheme=toy_config_scheme", "partition.options.shards=many"]).startswith(
        "partition.options.shards: Input should be a valid integer")
