"""Recipes: every YAML under recipes/configs validates, its header is the command that runs it, and every
aggregation method has a recipe whose options the method accepts."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.aggregators import AGGREGATORS, get_aggregator, method_options
from fedlora.config import load_config
from fedlora.protocol.hierfedlora import HierFedLoRA, HierOptions

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
RECIPES = sorted(CONFIGS.rglob("*.yaml"))
IDS = [str(p.relative_to(CONFIGS)) for p in RECIPES]
# Options a recipe may leave out: they follow the run (FLoRA's seed is the run's seed unless given).
FOLLOW_THE_RUN = {"seed"}


def by_method(name: str) -> Path:
    return CONFIGS / name / "minilm_sst2.yaml"


def test_recipes_found():
    assert len(RECIPES) >= len(AGGREGATORS)


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_validates(path):
    load_config(path)


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_header_is_the_command_that_runs_it(path):
    first, second = path.read_text().splitlines()[:2]
    assert first == f"# fedlora run {path.relative_to(ROOT).as_posix()}"
    assert second.startswith("# ") and len(second) > 10, "the second line says what the recipe shows"


@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_recipe_method_options_build_the_method(path):
    fed = load_config(path).federation
    if fed.method == HierFedLoRA.name:
        HierOptions(**fed.method_options).rules(0)
    else:
        get_aggregator(fed.method, **fed.method_options)
    assert path.parent.name in (fed.method, "hetero_ranks", "privacy", "results", "llm"), \
        "recipes/configs/<method>/ holds that method's recipes"


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_every_method_has_a_recipe_with_its_options_spelled_out(method):
    path = by_method(method)
    assert path.is_file(), f"no recipe for {method}: add {path.relative_to(ROOT)}"
    fed = load_config(path).federation
    assert fed.method == method
    assert set(fed.method_options) == set(method_options(method)) - FOLLOW_THE_RUN


@pytest.mark.parametrize("method", sorted(AGGREGATORS))
def test_minilm_sst2_recipes_run_the_same_experiment(method):
    """Only the method, its options and the run folder differ from HEXA's recipe."""
    reference = load_config(by_method("hexa")).to_dict()
    config = load_config(by_method(method)).to_dict()
    for cfg in (reference, config):
        cfg.pop("output_dir")
        cfg["federation"].pop("method")
        cfg["federation"].pop("method_options")
    assert config == reference


def test_hexa_recipe_is_the_default_experiment():
    recipe = load_config(by_method("hexa"))
    default = load_config()
    default.federation.method_options = method_options("hexa")
    assert recipe == default


SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_sweep_recipes_plan_their_cells(path):
    from fedlora.sweep import load_sweep, plan_cells

    assert path.read_text().splitlines()[0].startswith(f"# fedlora sweep {path.relative_to(ROOT).as_posix()}")
    assert plan_cells(load_sweep(path))
