"""Reports for results folders (fedlora.report_dir), from hand-written folders: the tables are checked against
numpy's mean and std of the values written, the images against their PNG headers."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from fedlora.report_dir import Cell, load_folder, write_report

METHODS = ("fedit", "ffa")
PARTITIONS = ("dir0.5", "iid")
SEEDS = (0, 1, 2)
ROUNDS = 3
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\) \((\d+) x (\d+) px\)")


def value(method: str, partition: str, seed: int, rnd: int, offset: float = 0.0) -> float:
    """A distinct, reproducible metric for every cell and round (ffa ahead on dir0.5, fedit on iid); each
    setting has its own spread over seeds."""
    base, spread = {("fedit", "dir0.5"): (0.60, 1), ("ffa", "dir0.5"): (0.70, 3), ("fedit", "iid"): (0.80, 2),
                    ("ffa", "iid"): (0.75, 5)}[(method, partition)]
    return round(base + 0.03 * rnd + 0.004 * spread * seed * (seed + 1) + offset, 6)


def record(method: str, partition: str, seed: int, rnd: int, metric_name: str = "accuracy") -> dict:
    metric = value(method, partition, seed, rnd)
    return {"round": rnd, "method": method, "metric_name": metric_name, "metric": metric,
            "metrics": {"f1": value(method, partition, seed, rnd, 0.05), "accuracy": metric},
            "eval_loss": 1.0 - metric, "agg_error": 0.0 if method == "fedit" else 1e-3 * (seed + 1) / rnd,
            "bytes_up": 1_000_000 * (2 if method == "ffa" else 1), "bytes_down": 500_000,
            "sim_round_s": 60.0 * rnd, "round_time_s": 2.0, "wall_time_s": 2.0 * rnd}


def write_log(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def make_sweep(root: Path, metric_name: str = "accuracy") -> Path:
    """2 methods x 2 partitions x 3 seeds, 3 rounds each, plus a pending cell and a running one (1 round)."""
    cells = []
    for method in METHODS:
        for partition in PARTITIONS:
            for seed in SEEDS:
                name = f"{method}-{partition}-s{seed}"
                write_log(root / "cells" / name, [record(method, partition, seed, r, metric_name)
                                                  for r in range(1, ROUNDS + 1)])
                keys = {"method": method, "partition": partition, "seed": seed, "rank": 8, "lr": 0.005}
                cells.append({"name": name, "dir": f"cells/{name}", "keys": keys, "status": "done"})
    # not done: one with no log at all, one with a partial log whose (outlying) values must not count
    cells.append({"name": "fedit-iid-s3", "dir": "cells/fedit-iid-s3", "status": "pending",
                  "keys": {"method": "fedit", "partition": "iid", "seed": 3, "rank": 8, "lr": 0.005}})
    write_log(root / "cells" / "ffa-iid-s3", [{**record("ffa", "iid", 0, 1, metric_name), "metric": 99.0}])
    cells.append({"name": "ffa-iid-s3", "dir": "cells/ffa-iid-s3", "status": "running",
                  "keys": {"method": "ffa", "partition": "iid", "seed": 3, "rank": 8, "lr": 0.005}})
    axes = {"method": list(METHODS), "partition": list(PARTITIONS), "seed": [*SEEDS, 3], "rank": [8],
            "lr": [0.005]}
    (root / "sweep.json").write_text(json.dumps({"axes": axes, "cells": cells}))
    return root


def section(markdown: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """The table under ``heading``: its header cells and, per row label, its cells."""
    lines = markdown.splitlines()
    start = lines.index(heading) + 1
    start += next(i for i, line in enumerate(lines[start:]) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    return table[0], {row[0]: row[1:] for row in table[2:]}


def expected_cell(values: list[float], bold: bool) -> str:
    """The report's format, computed here with numpy: mean ± std (ddof=1) (n=k), the mean bold if best."""
    mean = f"{np.mean(values):.4f}"
    return f"{f'**{mean}**' if bold else mean} ± {np.std(values, ddof=1):.4f} (n={len(values)})"


def expected_rows(higher: bool, offset: float = 0.0) -> dict[str, list[str]]:
    """Per method, its cell in each partition's column, with the best mean of each column in bold."""
    rows: dict[str, list[str]] = {m: [] for m in METHODS}
    for partition in PARTITIONS:
        finals = {m: [value(m, partition, s, ROUNDS, offset) for s in SEEDS] for m in METHODS}
        best = (max if higher else min)(METHODS, key=lambda m: np.mean(finals[m]))
        for method in METHODS:
            rows[method].append(expected_cell(finals[method], method == best))
    return rows


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory) -> tuple[Path, str]:
    root = make_sweep(tmp_path_factory.mktemp("sweep"))
    path = write_report(root)
    return path, path.read_text()


def test_every_linked_image_exists_at_its_stated_size(sweep_report):
    path, markdown = sweep_report
    assert path == path.parent / "report.md"
    links = IMAGE.findall(markdown)
    assert len(links) == 4 * len(PARTITIONS)  # four plots per partition, all with data here
    for rel, width, height in links:
        image = path.parent / rel
        assert rel.startswith("figures/") and image.stat().st_size > 0
        assert png_size(image) == (int(width), int(height)) == (840, 504)
    assert "![accuracy per round, dir0.5](figures/metric_dir0.5.png) (840 x 504 px)" in markdown


def test_the_metric_table_is_numpys_mean_and_std_of_the_final_rounds_with_the_best_in_bold(sweep_report):
    _, markdown = sweep_report
    header, rows = section(markdown, "## Final accuracy")
    assert header == ["Setting", *PARTITIONS]
    assert list(rows) == list(METHODS)  # rank and lr are constant: not in the labels
    assert rows == expected_rows(higher=True)
    assert rows["ffa"][0].startswith("**") and rows["fedit"][1].startswith("**")  # the data's winners


def test_a_named_metrics_dict_gives_a_table_per_name(sweep_report):
    _, markdown = sweep_report
    for name, offset in (("f1", 0.05), ("accuracy", 0.0)):
        _, rows = section(markdown, f"## Final {name} (from `metrics`)")
        assert rows == expected_rows(higher=True, offset=offset)


def test_the_header_aggregation_error_and_communication_tables(sweep_report):
    _, markdown = sweep_report
    assert "- Kind: sweep" in markdown and "- Cells: 12" in markdown
    assert "- Cells not done: 2 (pending: 1, running: 1)" in markdown
    assert "rank=8" in markdown and "lr=0.005" in markdown
    assert "- Total wall time: 72.0 s = 0.02 h (sum over the 12 runs" in markdown  # last wall_time_s 6.0 each
    _, rows = section(markdown, "## Final aggregation error")
    assert rows["ffa"][0] == f"{np.mean([1e-3 * (s + 1) / ROUNDS for s in SEEDS]):.1e}"
    assert rows["fedit"][0] == f"{0.0:.1e}"
    header, rows = section(markdown, "## Equal communication")
    assert header[1:3] == ["dir0.5 MB", "dir0.5 accuracy/MB"]
    total_mb = ROUNDS * (2_000_000 + 500_000) / 1e6
    assert rows["ffa"][0] == f"{total_mb:,.2f}"
    per_mb = np.mean([value("ffa", "dir0.5", s, ROUNDS) / total_mb for s in SEEDS])
    assert rows["ffa"][1].strip("*") == f"{per_mb:.4g}"


def test_cells_not_done_are_left_out(sweep_report, tmp_path):
    _, markdown = sweep_report
    _, rows = section(markdown, "## Final accuracy")
    assert all(cell.endswith("(n=3)") for cells in rows.values() for cell in cells)
    assert "99.0" not in markdown
    cells = load_folder(make_sweep(tmp_path))
    assert len(cells) == 12 and all(isinstance(c, Cell) for c in cells)
    assert {c.name for c in cells}.isdisjoint({"fedit-iid-s3", "ffa-iid-s3"})
    assert all(c.path == tmp_path / "cells" / c.name and (c.path / "metrics.jsonl").is_file() for c in cells)


def test_a_lower_is_better_metric_bolds_the_smallest_mean(tmp_path):
    markdown = write_report(make_sweep(tmp_path, "perplexity"), tmp_path / "out").read_text()
    assert (tmp_path / "out" / "report.md").exists() and (tmp_path / "out" / "figures").is_dir()
    _, rows = section(markdown, "## Final perplexity")
    assert rows == expected_rows(higher=False)
    assert rows["fedit"][0].startswith("**") and rows["ffa"][1].startswith("**")  # the smaller means


def test_a_single_run_folder_and_missing_data(tmp_path):
    records = [{**record("fedit", "iid", 0, r), "method": "hexa", "agg_error": None, "metrics": None}
               for r in (1, 2)]
    records.append({"round": 3, "method": "hexa", "metric": None, "agg_error": None})  # nothing to draw
    records.append({"round": None, "method": "hexa", "metric": 0.99})  # no round: not a final value
    write_log(tmp_path / "run", records)
    (cell,) = load_folder(tmp_path / "run")
    assert cell.name == "run" and cell.keys == {"method": "hexa"} and len(cell.records) == 4
    assert cell.path == tmp_path / "run"
    markdown = write_report(tmp_path / "run").read_text()
    assert "- Kind: run" in markdown and "(from `metrics`)" not in markdown
    assert "_No aggregation error recorded: plot skipped._" in markdown
    header, rows = section(markdown, "## Final accuracy")
    assert header == ["Setting", "accuracy"]
    assert rows == {"hexa": [f"{records[1]['metric']:.4f} (n=1)"]}  # round 3 has no metric
    for rel, width, height in IMAGE.findall(markdown):
        assert png_size(tmp_path / "run" / rel) == (int(width), int(height))


def test_settings_are_labelled_by_their_varying_keys_and_seeds_pool(tmp_path):
    cells = []
    for lr in (0.005, 0.01):
        for seed in (0, 1):
            name = f"fedit-lr{lr}-s{seed}"
            offset = 0.1 if lr == 0.01 else 0.0
            write_log(tmp_path / "cells" / name, [{**record("fedit", "iid", seed, r),
                                                   "metric": value("fedit", "iid", seed, r, offset)}
                                                  for r in (1, 2)])
            keys = {"method": "fedit", "partition": "iid", "seed": seed, "lr": lr}
            cells.append({"name": name, "dir": f"cells/{name}", "keys": keys, "status": "done"})
    (tmp_path / "sweep.json").write_text(json.dumps({"axes": {}, "cells": cells}))
    markdown = write_report(tmp_path).read_text()
    assert "- Constant keys: method=fedit · partition=iid" in markdown
    assert "- Cells not done: 0" in markdown
    header, rows = section(markdown, "## Final accuracy")
    assert header == ["Setting", "accuracy"]  # partition constant: one column
    finals = {lr: [value("fedit", "iid", s, 2, off) for s in (0, 1)]
              for lr, off in ((0.005, 0.0), (0.01, 0.1))}
    assert rows == {"fedit · lr=0.005": [expected_cell(finals[0.005], False)],
                    "fedit · lr=0.01": [expected_cell(finals[0.01], True)]}
    assert len(IMAGE.findall(markdown)) == 4


def test_a_compare_folder(tmp_path):
    for method in METHODS:
        write_log(tmp_path / method, [record(method, "iid", 0, r) for r in range(1, ROUNDS + 1)])
    (tmp_path / "notes").mkdir()  # a subfolder without a log is ignored
    cells = load_folder(tmp_path)
    assert [(c.name, c.keys) for c in cells] == [(m, {"method": m}) for m in METHODS]
    markdown = write_report(tmp_path).read_text()
    assert "- Kind: compare" in markdown
    _, rows = section(markdown, "## Final accuracy")
    assert rows["fedit"] == [f"**{value('fedit', 'iid', 0, ROUNDS):.4f}** (n=1)"]


def test_a_folder_without_results_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError) as err:
        load_folder(tmp_path)
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not a folder"):
        write_report(tmp_path / "missing")


def test_a_single_named_metric_equal_to_the_headline_gets_no_second_table(tmp_path):
    """SST-2 records ``metrics: {"accuracy": x}`` beside ``metric``: one table, not the same one twice."""
    records = [{**record("fedit", "iid", 0, r), "metrics": {"accuracy": value("fedit", "iid", 0, r)}}
               for r in (1, 2)]
    write_log(tmp_path / "run", records)
    markdown = write_report(tmp_path / "run").read_text()
    assert markdown.count("## Final accuracy") == 1 and "(from `metrics`)" not in markdown


def test_the_last_rounds_table_averages_each_seeds_last_three_rounds_first(sweep_report):
    """``## Mean accuracy over the last 3 rounds``: numpy's mean of each seed's last three values, then the
    mean and std over seeds, the best mean in bold."""
    _, markdown = sweep_report
    header, rows = section(markdown, "## Mean accuracy over the last 3 rounds")
    assert header == ["Setting", *PARTITIONS]
    want: dict[str, list[str]] = {m: [] for m in METHODS}
    for partition in PARTITIONS:
        means = {m: [float(np.mean([value(m, partition, s, r) for r in range(ROUNDS - 2, ROUNDS + 1)]))
                     for s in SEEDS] for m in METHODS}
        best = max(METHODS, key=lambda m: np.mean(means[m]))
        for m in METHODS:
            want[m].append(expected_cell(means[m], m == best))
    assert rows == want


def test_a_run_shared_by_several_cells_counts_once_in_the_wall_time(tmp_path):
    """The centralized ceiling: one run folder listed under every partition; 6 s + 6 s, not 6 s x 3."""
    write_log(tmp_path / "cells" / "centralized-s0", [record("fedit", "iid", 0, r) for r in range(1, ROUNDS + 1)])
    write_log(tmp_path / "cells" / "ffa-iid-s0", [record("ffa", "iid", 0, r) for r in range(1, ROUNDS + 1)])
    cells = [{"name": f"centralized-{p}-s0", "dir": "cells/centralized-s0", "status": "done",
              "keys": {"method": "centralized", "partition": p, "seed": 0}} for p in PARTITIONS]
    cells.append({"name": "ffa-iid-s0", "dir": "cells/ffa-iid-s0", "status": "done",
                  "keys": {"method": "ffa", "partition": "iid", "seed": 0}})
    axes = {"method": ["centralized", "ffa"], "partition": list(PARTITIONS), "seed": [0]}
    (tmp_path / "sweep.json").write_text(json.dumps({"axes": axes, "cells": cells}))
    markdown = write_report(tmp_path).read_text()
    assert "- Cells: 3" in markdown and "- Total wall time: 12.0 s = 0.00 h (sum over the 2 runs" in markdown
