"""``fedlora sweep``: the grid, the centralized ceiling, the validation split, and a sweep killed midway that
finishes only its missing cells with the numbers of an uninterrupted sweep (the real CLI, SIGKILL), and two
workers sharing one sweep."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine_fixtures import run_cli, start_cli, tiny_overrides
from fedlora.cli_results import _SweepProgress, time_left
from fedlora.sweep import claim, load_sweep, parse_method, plan_cells


def _sweep_file(tmp_path: Path, assets, out: Path, **extra) -> Path:
    model, tsv = assets
    base = [o for o in tiny_overrides(model, tsv, out / "unused", "fedex", 2) if not o.startswith("output_dir")]
    spec = {"overrides": base, "out": str(out), "methods": ["centralized", "fedex", "fra_fold=fra:fold_tail=true"],
            "partitions": {"iid": ["partition.scheme=iid"],
                           "dir0.5": ["partition.scheme=dirichlet", "partition.options.alpha=0.5"]},
            "seeds": [0, 1], **extra}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(("elapsed", "finished", "remaining", "said"), [
    (600, 2, 58, "about 4h 50m left"),  # 300 s a run, 58 runs: 17,400 s
    (600, 3, 2, "about 7m left"),  # 200 s a run, 2 runs: 6 min 40 s, to the nearest minute
    (90, 3, 1, "under a minute left"),
    (3600, 1, 1, "about 1h 00m left"),
    (100, 4, 0, "none left"),
    (100, 0, 5, None),  # nothing finished since the start: no pace yet
])
def test_time_left_is_the_pace_so_far_times_the_runs_left(elapsed, finished, remaining, said):
    assert time_left(elapsed, finished, remaining) == said


def test_a_sweeps_time_left_is_at_the_recorded_pace_of_every_run_done_shared_by_its_workers(capsys):
    took = {Path("a"): 600.0, Path("b"): 1800.0, Path("c"): None}  # c: a run without times (no pace)
    view = _SweepProgress(10, {Path("a")}, took.get, workers=2)
    assert view.time_left() == "about 45m left"  # 600 s a run, 9 runs on 2 workers: 2,700 s
    view.cell_done({Path("a"), Path("b")})  # 1,200 s a run, 8 runs on 2 workers: 4,800 s
    view.cell_done({Path("a"), Path("b"), Path("c")})  # still 1,200 s a run, 7 runs on 2 workers: 4,200 s
    assert capsys.readouterr().err.splitlines() == ["sweep: 2/10 runs done, about 1h 20m left",
                                                    "sweep: 3/10 runs done, about 1h 10m left"]


def test_a_sweeps_time_left_reads_each_finished_runs_records_once():
    reads = []
    view = _SweepProgress(5, set(), lambda d: reads.append(d) or 60.0, workers=1)
    for n in range(1, 5):
        view.cell_done({Path(str(k)) for k in range(n)})
    assert sorted(reads) == [Path("0"), Path("1"), Path("2"), Path("3")]  # not 1 + 2 + 3 + 4 = 10 reads


def test_a_helper_worker_counts_the_pace_of_every_worker(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda argv, **kw: started.append(argv))
    from fedlora.cli_workers import start_workers

    start_workers("sweep.yaml", tmp_path, None, extra=2)  # --workers 3: this process and two helpers
    assert len(started) == 2
    assert all(argv[argv.index("--of-workers") + 1] == "3" and "--no-report" in argv for argv in started)


def test_method_items():
    assert parse_method("fedex").label == "fedex"
    m = parse_method("fra_fold=fra:fold_tail=true:ffa_after=2")
    assert (m.label, m.name) == ("fra_fold", "fra")
    assert m.overrides == ("federation.method_options.fold_tail=true", "federation.method_options.ffa_after=2")
    assert parse_method("hetlora:prune_threshold=0.05").label == "hetlora"
    with pytest.raises(ValueError, match="expected name"):
        parse_method("fra:fold_tail")
    m = parse_method({"label": "fra_lr", "method": "fra:fold_tail=true", "overrides": ["train.lr=0.002"]})
    assert (m.label, m.name) == ("fra_lr", "fra")
    assert m.overrides == ("federation.method_options.fold_tail=true", "train.lr=0.002")
    with pytest.raises(ValueError, match="a mapping takes"):
        parse_method({"method": "fedit", "lr": 1})


def test_the_grid_and_the_centralized_ceiling(assets, tmp_path):
    from fedlora.sweep import cell_config

    spec = load_sweep(_sweep_file(tmp_path, assets, tmp_path / "grid", lrs=[0.01, 0.001]))
    cells = plan_cells(spec)
    assert len(cells) == 3 * 2 * 2 * 2  # methods x partitions x lrs x seeds
    central = [c for c in cells if c.keys["method"] == "centralized"]
    assert len({c.dir for c in central}) == 4  # one run per seed and lr, shared by both partitions
    cfg = cell_config(spec, central[0])
    assert cfg.partition.num_clients == 1 and cfg.federation.clients_per_round == 1
    assert cfg.train.local_steps == 3 * 3  # clients_per_round x local_steps of the federation
    fra = cell_config(spec, next(c for c in cells if c.keys["method"] == "fra_fold"))
    assert fra.federation.method == "fra" and fra.federation.method_options == {"fold_tail": True}
    assert {c.keys["lr"] for c in cells} == {0.01, 0.001}
    assert len({c.name for c in cells if c.keys["method"] != "centralized"}) == 16


@pytest.mark.parametrize("text, fragment", [
    ("methods: []\nseeds: [0]", "methods must be a non-empty list"),
    ("methods: [fedit]\nseeds: [0]\nmethod: x", "unknown key 'method'"),
    ("methods: [fedit, fedit]\nseeds: [0]", "listed twice"),
    ("methods: [fedit]\nseeds: [zero]", "whole numbers"),
    ("methods: [fedit]\nseeds: [0]\nconfig: nowhere.yaml", "does not exist"),
])
def test_a_bad_sweep_file_is_one_line(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_sweep(path)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_validation_fraction_is_held_out_of_training(assets, tmp_path):
    from fedlora.config import load_config
    from fedlora.sim.data import load_dataset_for

    model, tsv = assets
    cfg = load_config(None, [*tiny_overrides(model, tsv, tmp_path / "v"), "data.validation_fraction=0.25"])
    train, held = load_dataset_for(cfg.data, seed=0)
    whole, _ = load_dataset_for(load_config(None, tiny_overrides(model, tsv, tmp_path / "w")).data, seed=0)
    assert len(held) == round(0.25 * (len(train) + len(held)))
    assert (sorted(train.texts + held.texts) == sorted(whole.texts + _.texts)
            or len(train) + len(held) <= len(whole) + len(_))
    assert (not set(zip(train.texts, train.labels)) & set(zip(held.texts, held.labels))
            or len(set(train.texts)) < len(train))


def _numbers(out: Path) -> dict[str, list]:
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    return {c["name"]: [(r["round"], r["metric"], r["eval_loss"], r.get("agg_error"))
                        for r in map(json.loads, (out / c["dir"] / "metrics.jsonl").read_text().splitlines())]
            for c in cells}


@pytest.fixture(scope="module")
def whole(assets, tmp_path_factory) -> Path:
    """The tiny sweep, uninterrupted, one process: the numbers the others must reproduce."""
    tmp_path = tmp_path_factory.mktemp("whole")
    whole = tmp_path / "whole"
    done = run_cli("sweep", _sweep_file(tmp_path, assets, whole), cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (whole / "report.md").exists()
    # not a terminal: one line per finished run, the last one at 10 of 10 (a centralized run serves both splits)
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("sweep: ") and "runs done" in ln]
    assert [ln.split()[1] for ln in lines] == [f"{k}/10" for k in range(1, 11)], lines
    assert all(ln.endswith(" left") for ln in lines), lines  # a pace from the first finished run on
    assert lines[-1].endswith("runs done, none left")
    manifest = json.loads((whole / "sweep.json").read_text())
    assert {c["status"] for c in manifest["cells"]} == {"done"} and len(manifest["cells"]) == 12
    return whole


def test_a_killed_sweep_finishes_only_the_missing_cells_with_the_same_numbers(assets, tmp_path, whole):

    cut = tmp_path / "cut"
    spec = _sweep_file(tmp_path, assets, cut)
    proc = start_cli("sweep", spec, cwd=tmp_path)
    second = cut / "cells" / "fedex__iid__s0"
    deadline = time.monotonic() + 600
    while not ((second / "metrics.jsonl").exists() and (second / "metrics.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-cell when the machine keeps up: round 1 written, round 2 not
    proc.wait()
    # what the killed sweep had finished (a slow machine may have got further before the kill landed)
    dirs = {c["dir"] for c in json.loads((cut / "sweep.json").read_text())["cells"]}
    finished = sorted(d for d in dirs if (cut / d / "metrics.jsonl").exists()
                      and (cut / d / "metrics.jsonl").read_text().count("\n") == 2)  # both rounds recorded
    assert "cells/centralized__s0" in finished and len(finished) < 10
    before = {d: (cut / d / "metrics.jsonl").stat().st_mtime_ns for d in finished}
    again = run_cli("sweep", spec, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"10 runs ({len(finished)} done, {10 - len(finished)} to run)" in again.stderr.replace("\n", " ")
    # the runs the killed sweep finished give a pace before any new one ends; the count goes on from them
    start = next(ln for ln in again.stderr.splitlines() if ln.startswith("sweep: 10 runs"))
    assert re.search(r"; (about \d+(h \d+)?m|under a minute) left at the pace of the runs done$", start), start
    assert f"sweep: {len(finished) + 1}/10 runs done" in again.stderr
    assert {d: (cut / d / "metrics.jsonl").stat().st_mtime_ns for d in finished} == before  # not run again
    assert _numbers(cut) == _numbers(whole)


def test_a_claim_is_held_until_its_process_ends_even_when_killed(tmp_path):
    with claim(tmp_path, "cell") as first:
        with claim(tmp_path, "cell") as second, claim(tmp_path, "other") as other:
            assert first and not second and other
    with claim(tmp_path, "cell") as again:
        assert again  # released when the block ended
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from fedlora.sweep import claim\n"
        f"with claim(Path({str(tmp_path)!r}), 'cell') as held:\n"
        "    print(held, flush=True); time.sleep(600)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "True"
        with claim(tmp_path, "cell") as held:
            assert not held
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a crashed worker leaves no stale claim
        holder.wait()
    with claim(tmp_path, "cell") as held:
        assert held


def test_two_workers_run_every_cell_once_with_the_numbers_of_one_process(assets, tmp_path, whole):
    pair = tmp_path / "pair"
    done = run_cli("sweep", _sweep_file(tmp_path, assets, pair), "--workers", "2", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (pair / "report.md").exists() and (pair / "workers" / "worker-1.log").exists()
    manifest = json.loads((pair / "sweep.json").read_text())
    assert {c["status"] for c in manifest["cells"]} == {"done"}
    # each run once: a cell run twice at once would resume over itself or start again from round 1
    starts = {d: (pair / d / "run.log").read_text().count("round 1/") for d in {c["dir"] for c in manifest["cells"]}}
    assert set(starts.values()) == {1}, starts
    ours, theirs = _numbers(pair), _numbers(whole)
    assert ours.keys() == theirs.keys()
    for name, rounds in theirs.items():  # one thread per worker: sums may round differently in the last bits
        assert [r[:2] for r in ours[name]] == [r[:2] for r in rounds], name
        assert [r[2] for r in ours[name]] == pytest.approx([r[2] for r in rounds], rel=1e-4), name  # eval loss
        errors = [(r[3], mine[3]) for r, mine in zip(rounds, ours[name])]
        assert all((a is None) == (b is None) and (a is None or b == pytest.approx(a, abs=1e-6)) for a, b in errors)


def test_a_cell_another_process_holds_is_left_to_it_and_taken_up_once_free(assets, tmp_path):
    out = tmp_path / "held"
    spec = _sweep_file(tmp_path, assets, out, methods=["fedex"], partitions={"iid": ["partition.scheme=iid"]})
    with claim(out, "fedex__iid__s1") as held:  # as a worker running that cell would
        assert held
        first = run_cli("sweep", spec, cwd=tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "1 runs are held by other processes" in first.stderr.replace("\n", " ")
    assert not (out / "report.md").exists() and not (out / "cells" / "fedex__iid__s1").exists()
    assert (out / "cells" / "fedex__iid__s0" / "metrics.jsonl").read_text().count("\n") == 2
    again = run_cli("sweep", spec, cwd=tmp_path, timeout=900)  # the holder is gone: the cell is free
    assert again.returncode == 0, again.stderr[-2000:]
    assert "2 runs (1 done, 1 to run)" in again.stderr.replace("\n", " ")
    assert (out / "cells" / "fedex__iid__s1" / "metrics.jsonl").read_text().count("\n") == 2
    assert (out / "report.md").exists()


def test_workers_without_file_locks_is_one_line(assets, tmp_path):
    spec = _sweep_file(tmp_path, assets, tmp_path / "nolock", methods=["fedex"], seeds=[0])
    # the real CLI on a system without fcntl: `import fcntl` fails
    code = "import sys; sys.modules['fcntl'] = None; from fedlora.cli import main; sys.argv[0] = 'fedlora'; main()"
    result = run_cli("sweep", spec, "--workers", "2", cwd=tmp_path, python=("-c", code), timeout=900)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--workers needs file locks (fcntl)" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nolock" / "cells").exists()  # nothing trained
