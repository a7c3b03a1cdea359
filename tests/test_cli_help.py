"""``fedlora --help`` and each command's help, as a user reads them in a terminal: every command's summary
on one line (a docstring's line breaks are not the user's), and every argument's help shown, brackets
included (``[CONFIG.yaml]`` is text, not markup)."""

from __future__ import annotations

import subprocess

import pytest

from engine_fixtures import cli_argv, cli_env


def _help(*args: str) -> list[str]:
    done = subprocess.run(cli_argv(*args, "--help"), env=cli_env() | {"COLUMNS": "220"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return (done.stdout + done.stderr).splitlines()


def test_each_command_summary_is_one_line():
    lines = _help()
    deploy = next(ln for ln in lines if "│ deploy" in ln)
    assert "throwaway CA) and CLI-managed node authentication" in deploy, deploy
    sweep = next(ln for ln in lines if "│ sweep" in ln)
    assert "write the report. Several" in sweep, sweep


@pytest.mark.parametrize(("command", "shown"), [
    ("run", "[CONFIG.yaml] [key.path=value ...]"),
    ("compare", "[CONFIG.yaml] [key.path=value ...]"),
    ("deploy", "[CONFIG.yaml] [key.path=value ...]"),
    ("sweep", "the sweep file (YAML: config, overrides"),
    ("report", "a run, compare or sweep folder"),
    ("export", "a run folder (with checkpoints/)"),
])
def test_every_argument_shows_its_help(command, shown):
    args = [ln for ln in _help(command) if "│ " in ln and ("args" in ln or "*" in ln.split("│")[1][:5])]
    assert any(shown in ln for ln in args), args
