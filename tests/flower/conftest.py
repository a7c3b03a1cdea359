"""Fixtures of the Flower tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def serverapp_process(monkeypatch):
    """What Flower sets in a ServerApp's process, without which ``Message(...)`` cannot be built."""
    from flwr.supercore.task_identity import TaskIdentity

    from fake_grid import RUN_ID

    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # flwr.common.constant.SUPERLINK_NODE_ID
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
