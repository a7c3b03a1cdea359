"""Every user error through the real CLI: exit code 2, exactly one line on stderr, no traceback.

One table (``CASES``) drives ``python -m fedlora.cli`` in a subprocess with stderr piped, as in CI logs or
``make``: rich does not see a terminal there, so a long message must still come out on one line. Each case
names the fragment its line must contain (the key, file or value at fault) and, where it matters, the paths
that must not exist afterwards (nothing is created before the input is known to be good).

The cases copy and damage one finished tiny run built once per module (2 rounds, one local step each).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from engine_fixtures import make_sentiment_tsv, make_tiny_bert, run_cli, tiny_overrides

pytestmark = pytest.mark.slow

@dataclass(frozen=True)
class World:
    """The module's shared assets: tiny model, TSV, a finished 2-round run and its 1-round cut."""

    model: Path
    data: Path
    run1: Path
    run2: Path

    def tiny(self, out: Path, rounds: int = 2) -> list[str]:
        return [*tiny_overrides(self.model, self.data, out, "hexa", rounds), "train.local_steps=1"]

    def tiny_for_compare(self) -> list[str]:
        return [o for o in self.tiny(Path("unused")) if not o.startswith(("federation.method", "output_dir"))]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("cli-errors")
    w = World(make_tiny_bert(root / "tiny-bert"), make_sentiment_tsv(root / "train.tsv", rows=120),
              root / "run1", root / "run2")
    proc = run_cli("run", *w.tiny(w.run2), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (1, 2):
        assert (_round(w.run2, r) / "correction.safetensors").is_file(), f"no correction in round {r}"
    # the 1-round run: the 2-round one cut back to its first round (a second training run costs ~12 s)
    shutil.copytree(w.run2, w.run1)
    shutil.rmtree(_round(w.run1, 2))
    (w.run1 / "checkpoints" / "latest.json").write_text(json.dumps({"round": 1, "dir": "round_0001"}))
    metrics = w.run1 / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    return w


def _round(run: Path, r: int) -> Path:
    return run / "checkpoints" / f"round_{r:04d}"


def _copy(src: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(src, tmp / "run"))


# ---------------------------------------------------------------- the table

@dataclass
class Prepared:
    argv: list[str]
    absent: list[Path] = field(default_factory=list)  # must not exist after the command
    unchanged: dict[Path, bytes] = field(default_factory=dict)  # files whose bytes must survive


@dataclass(frozen=True)
class Case:
    prepare: Callable[[World, Path], Prepared]
    fragments: tuple[str, ...]  # regexes; each must match the one stderr line


def lit(text: str) -> str:
    return re.escape(text)


def _bad_run(w: World, tmp: Path, *extra: str) -> Prepared:
    """``run`` on the tiny setup plus ``extra`` overrides; the output folder must not appear."""
    out = tmp / "out"
    return Prepared(["run", *w.tiny(out), *extra], absent=[out])


def _bad_deploy(w: World, tmp: Path, *extra: str) -> Prepared:
    out = tmp / "out"
    return Prepared(["deploy", *w.tiny(out), *extra], absent=[out])


def _bad_run_may_create(w: World, tmp: Path, *extra: str) -> Prepared:
    return Prepared(["run", *w.tiny(tmp / "out"), *extra])


def _unknown_label(w: World, tmp: Path) -> Prepared:
    # test_data.py's "unknown label": a value outside a GLUE task's fixed label set ({0, 1} for SST-2)
    glue = tmp / "glue" / "SST-2"
    glue.mkdir(parents=True)
    rows = [f"{'good fun' if i % 2 else 'dull film'}\t{i % 2}" for i in range(40)]
    (glue / "train.tsv").write_text("sentence\tlabel\n" + "\n".join([*rows, "so so\tmaybe"]) + "\n")
    (glue / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows[:10]) + "\n")
    return _bad_run_may_create(w, tmp, "data.task=sst2", f"data.data_dir={tmp / 'glue'}")


def _resume_missing(w: World, tmp: Path) -> Prepared:
    missing = tmp / "does-not-exist"
    return Prepared(["run", "--resume", str(missing)], absent=[missing])


def _resume_with(*overrides: str) -> Callable[[World, Path], Prepared]:
    def prepare(w: World, tmp: Path) -> Prepared:
        run = _copy(w.run2, tmp)
        return Prepared(["run", "--resume", str(run), *overrides])

    return prepare


def _compare_unknown_method(w: World, tmp: Path) -> Prepared:
    out = tmp / "cmp"
    return Prepared(["compare", "--methods", "fedit,fedexx", "--out", str(out), *w.tiny_for_compare()],
                    absent=[out])


def _compare_existing_output(w: World, tmp: Path) -> Prepared:
    out = tmp / "cmp"
    metrics = out / "fedit" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_bytes(b'{"round": 1, "sentinel": true}\n')
    return Prepared(["compare", "--methods", "fedit", "--out", str(out), *w.tiny_for_compare()],
                    unchanged={metrics: metrics.read_bytes()})


def _damaged_run1(
    damage: Callable[[Path], None], command: str = "export"
) -> Callable[[World, Path], Prepared]:
    def prepare(w: World, tmp: Path) -> Prepared:
        run = _copy(w.run1, tmp)
        damage(run)
        return Prepared([command, str(run)] if command == "export" else ["run", "--resume", str(run)])

    return prepare


def _truncate_adapter(run: Path) -> None:
    path = _round(run, 1) / "adapter.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _delete_adapter(run: Path) -> None:
    (_round(run, 1) / "adapter.safetensors").unlink()


GARBAGE = b"\x00\xff\xfe not json at all \x89PNG\r\n{{{"


def _garbage_state(run: Path) -> None:
    (_round(run, 1) / "state.json").write_bytes(GARBAGE)


def _garbage_latest_and_state(run: Path) -> None:
    (run / "checkpoints" / "latest.json").write_bytes(GARBAGE)
    _garbage_state(run)


def _verify_flipped_correction(w: World, tmp: Path) -> Prepared:
    run = _copy(w.run2, tmp)
    path = _round(run, 1) / "correction.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return Prepared(["verify", str(run)])


def _export_rank_0(w: World, tmp: Path) -> Prepared:
    run = _copy(w.run2, tmp)
    out = tmp / "adapter"
    return Prepared(["export", str(run), "--rank", "0", "--out", str(out)], absent=[out])


LONG_PATH = "/no/such/" + "x" * 120 + ".tsv"

CASES = {
    "key-typo": Case(lambda w, t: _bad_run(w, t, "federation.roundz=3"),
                     (lit("federation.roundz"), lit("did you mean rounds?"))),
    "wrong-type": Case(lambda w, t: _bad_run(w, t, "federation.rounds=abc"), (lit("federation.rounds"),)),
    "missing-data-file": Case(lambda w, t: _bad_run_may_create(w, t, "data.task=/no/such/file.tsv"),
                              (lit("/no/such/file.tsv"),)),
    "wrong-column": Case(lambda w, t: _bad_run_may_create(w, t, "data.text_column=nope"), (lit("nope"),)),
    "unknown-method": Case(lambda w, t: _bad_run(w, t, "federation.method=nope"), (lit("nope"),)),
    "override-not-yaml": Case(lambda w, t: _bad_run(w, t, "federation.method=[bold]x"),
                              (lit("federation.method"), lit("'[bold]x'"), lit("quote it"))),  # shown, not markup
    "path-with-brackets": Case(lambda w, t: Prepared(["report", str(t / "[red]no-such")]), (lit("[red]no-such"),)),
    "unknown-label": Case(_unknown_label, (lit("maybe"),)),
    "model-not-on-hub-offline": Case(lambda w, t: _bad_run(w, t, "model.name=nobody/no-such-model"),
                                     (lit("nobody/no-such-model"),)),
    "model-dir-missing": Case(lambda w, t: _bad_run(w, t, "model.name=/no/such/dir"), (lit("/no/such/dir"),)),
    "method-option-typo": Case(
        lambda w, t: _bad_run(w, t, "federation.method=hexa", "federation.method_options.betaa=1"),
        (lit("betaa"), r"\bbeta\b"),  # names the typo and lists the real option
    ),
    "method-option-type": Case(
        lambda w, t: _bad_run(w, t, "federation.method=hexa", "federation.method_options.beta=abc"),
        (r"\bbeta\b",),
    ),
    "resume-missing-dir": Case(_resume_missing, (lit("does-not-exist"),)),
    "resume-other-override": Case(_resume_with("federation.clients_per_round=2"),
                                  (lit("federation.clients_per_round"),)),
    "resume-fewer-rounds": Case(_resume_with("federation.rounds=1"), (lit("federation.rounds"),)),
    "compare-unknown-method": Case(_compare_unknown_method, (lit("fedexx"),)),
    "compare-existing-output": Case(_compare_existing_output, (lit("--overwrite"),)),
    "export-truncated-adapter": Case(_damaged_run1(_truncate_adapter), (lit("adapter.safetensors"),)),
    "export-missing-adapter": Case(_damaged_run1(_delete_adapter), (lit("adapter.safetensors"),)),
    "resume-garbage-state": Case(_damaged_run1(_garbage_state, "resume"), (lit("state.json"),)),
    "export-garbage-latest-and-state": Case(_damaged_run1(_garbage_latest_and_state), (lit("state.json"),)),
    "verify-flipped-correction": Case(_verify_flipped_correction, (r"round( 1\b|_0001)",)),
    "export-rank-0": Case(_export_rank_0, (lit("--rank"),)),
    "config-file-missing": Case(lambda w, t: Prepared(["run", "nonexistent.yaml"]),
                                (lit("nonexistent.yaml"),)),
    "long-path-one-line": Case(lambda w, t: _bad_run_may_create(w, t, f"data.task={LONG_PATH}"),
                               (lit(LONG_PATH),)),
    "privacy-delta-at-least-1-over-n": Case(
        lambda w, t: _bad_run_may_create(w, t, "privacy.target_epsilon=3", "privacy.delta=0.5"),
        (lit("privacy.delta=0.5"), lit("1/n"))),
    "client-dp-method-that-leaks": Case(
        lambda w, t: _bad_run(w, t, "privacy.client_epsilon=3"),
        (lit("privacy.client_epsilon"), lit("fold_tail"))),
    "privacy-proximal-term": Case(
        lambda w, t: _bad_run(w, t, "privacy.target_epsilon=3", "federation.method_options.proximal_mu=0.1"),
        (lit("privacy.target_epsilon"), lit("proximal"))),
    # Flower: each is refused before any Flower process starts
    "engine-unknown": Case(lambda w, t: _bad_run(w, t, "--engine", "ray"), (lit("--engine"), lit("ray"))),
    "flower-stop-after": Case(lambda w, t: _bad_run(w, t, "--engine", "flower", "--stop-after", "1"),
                              (lit("--stop-after"),)),
    "flower-key-typo": Case(lambda w, t: _bad_run(w, t, "--engine", "flower", "flower.round_timeout=3"),
                            (lit("flower.round_timeout"),)),
    "deploy-bad-method": Case(lambda w, t: _bad_deploy(w, t, "federation.method=nope"), (lit("nope"),)),
    "deploy-zero-nodes": Case(lambda w, t: _bad_deploy(w, t, "--nodes", "0"), (lit("--nodes"),)),
    "deploy-resume-missing": Case(lambda w, t: Prepared(["deploy", "--resume", str(t / "gone")], absent=[t / "gone"]),
                                  (lit("gone"),)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_error_is_one_line_exit_2(world, tmp_path, name):
    case = CASES[name]
    prepared = case.prepare(world, tmp_path)
    proc = run_cli(*prepared.argv, cwd=tmp_path)
    shown = f"exit {proc.returncode}\n--- stderr\n{proc.stderr[-4000:]}\n--- stdout\n{proc.stdout[-1000:]}"
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, shown
    assert proc.returncode == 2, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].strip(), shown
    for fragment in case.fragments:
        assert re.search(fragment, lines[0]), f"{fragment!r} not in {lines[0]!r}"
    for path in prepared.absent:
        assert not path.exists(), f"{path} was created"
    for path, before in prepared.unchanged.items():
        assert path.read_bytes() == before, f"{path} was changed"


def test_long_message_case_is_over_100_characters():
    assert len(LONG_PATH) > 100


# ---------------------------------------------------------------- the good paths of the new options

def test_verify_intact_run_lists_every_round(world, tmp_path):
    run = _copy(world.run2, tmp_path)
    proc = run_cli("verify", run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (1, 2):  # a table row per round ("1 | intact" or "round_0001 ... intact")
        names = {str(r), f"round_{r:04d}"}
        rows = [line for line in proc.stdout.splitlines() if names & set(re.findall(r"[\w.]+", line))]
        assert any("intact" in row.lower() for row in rows), proc.stdout


def test_export_with_rank(world, tmp_path):
    run = _copy(world.run2, tmp_path)
    proc = run_cli("export", run, "--rank", "2", "--out", tmp_path / "adapter", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] <= 2 and all(r <= 2 for r in (config.get("rank_pattern") or {}).values()), config
