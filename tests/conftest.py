"""Shared test configuration.

Hypothesis runs derandomized (a fixed example sequence, no example database) so CI is reproducible;
``HYPOTHESIS_PROFILE=dev`` switches to random exploration locally.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def torch_single_thread():
    """One intra-op thread for modules of tiny-matrix tests.

    On a loaded 2-core machine, OpenMP's spinning workers make each 10x10 QR or matmul take milliseconds
    instead of microseconds (measured: 100x slower). Restored after the module, so tests that train a model
    keep every thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    """A tiny random BERT folder and a synthetic sentiment TSV (``engine_fixtures``), built once and only read."""
    from engine_fixtures import make_sentiment_tsv, make_tiny_bert

    root = tmp_path_factory.mktemp("assets")
    return make_tiny_bert(root / "tiny-bert"), make_sentiment_tsv(root / "train.tsv")
