"""Tests for fedlora.report: metrics log, tables and plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedlora.report import compare_markdown, higher_is_better, summary_table
from fedlora.report_plots import AGG_ERROR_FLOOR, plot_compare, plot_run
from fedlora.runlog import MetricsWriter, load_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(rnd: int, method: str = "hexa", agg_error: float | None = 1e-8, **extra) -> dict:
    rec = {
        "round": rnd,
        "method": method,
        "metric_name": "accuracy",
        "metric": 0.5 + 0.1 * rnd,
        "eval_loss": 1.0 - 0.1 * rnd,
        "local_metric": 0.45 + 0.1 * rnd,
        "train_loss": 1.1 - 0.1 * rnd,
        "agg_error": agg_error,
        "agg_error_max": None if agg_error is None else 3 * agg_error,
        "bytes_up": 1_000_000,
        "bytes_down": 2_000_000,
        "bytes_up_per_client": {"3": 500_000, "5": 500_000},
        "bytes_down_per_client": {"3": 1_000_000, "5": 1_000_000},
        "clients": ["3", "5"],
        "rejected": [],
        "round_time_s": 10.0,
        "wall_time_s": 20.0 + 10.0 * rnd,
    }
    rec.update(extra)
    return rec


def fake_runs() -> dict[str, list[dict]]:
    return {
        "fedavg": [make_record(r, "fedavg", agg_error=e) for r, e in [(1, 0.1), (2, 0.2), (3, 0.6)]],
        "ffa": [make_record(r, "ffa", agg_error=e, local_metric=None) for r, e in [(1, 2e-9), (2, 4e-9)]],
        "hexa": [make_record(r, "hexa", agg_error=e) for r, e in [(1, 0.0), (2, 3e-16), (3, 0.0)]],
    }


# --------------------------------------------------------------------------------------------------
# MetricsWriter / load_metrics
# --------------------------------------------------------------------------------------------------


def test_writer_round_trip(tmp_path: Path) -> None:
    records = [make_record(r) for r in (1, 2, 3)]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for rec in records:
            w.write(rec)
    assert load_metrics(tmp_path / "metrics.jsonl") == records
    assert load_metrics(tmp_path) == records  # a run directory works too
    assert w.closed
    with pytest.raises(ValueError):
        w.write(make_record(4))


def test_writer_converts_numpy_scalars_and_requires_round(tmp_path: Path) -> None:
    np = pytest.importorskip("numpy")
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write({"round": np.int64(1), "metric": np.float32(0.5), "v": np.arange(2)})
        with pytest.raises(ValueError, match="round"):
            w.write({"metric": 0.5})
    assert load_metrics(tmp_path) == [{"round": 1, "metric": 0.5, "v": [0, 1]}]


def test_partial_trailing_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    whole = [make_record(1), make_record(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"round": 3, "metr')
    assert load_metrics(path) == whole


def test_corrupt_middle_line_raises(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, \n{"round": 3}\n')
    with pytest.raises(ValueError, match=":2:"):
        load_metrics(path)


def test_writer_repairs_partial_tail_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(make_record(1)) + "\n" + '{"round": 2, "met')
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(make_record(2))
    assert [r["round"] for r in load_metrics(path)] == [1, 2]


@pytest.mark.parametrize("how", ["older copy", "removed", "emptied copy"])
def test_a_file_replaced_under_the_writer_gets_every_record_back(tmp_path: Path, how: str) -> None:
    """What ``git stash`` did to a running sweep: the committed copy (round 1) replaced the file the run
    held open (a new inode), and every later round went to the unlinked one."""
    path = tmp_path / "metrics.jsonl"
    written = [make_record(r) for r in (1, 2, 3)]
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(written[0])
        committed = path.read_text()
        w.write(written[1])
        path.unlink()  # git removes the file and writes its copy as a new one
        if how != "removed":
            path.write_text(committed if how == "older copy" else "")
        w.write(written[2])
        assert load_metrics(path) == written  # on disk at once, not only when the writer closes
        w.write(make_record(4))
    assert [r["round"] for r in load_metrics(path)] == [1, 2, 3, 4]
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # no temporary file left


def test_truncate_after_keeps_rounds_up_to_n(tmp_path: Path) -> None:
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for r in range(1, 6):
            w.write(make_record(r))
        assert w.truncate_after(3) == 3
        # The writer keeps appending to the rewritten file (resume).
        w.write(make_record(4, metric=0.123))
    records = load_metrics(tmp_path)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["metric"] == 0.123
    assert not list(tmp_path.glob("*.tmp"))  # no temp file left behind


def test_tensorboard_event_file_is_created(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    with MetricsWriter(tmp_path, tensorboard=True) as w:
        w.write(make_record(1))
        w.write(make_record(2))
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"hexa/metric", "hexa/agg_error", "hexa/bytes_up", "hexa/wall_time_s"} <= tags
    assert "hexa/round" not in tags and "hexa/local_metric" in tags
    assert [e.step for e in acc.Scalars("hexa/metric")] == [1, 2]
    assert acc.Scalars("hexa/metric")[1].value == pytest.approx(0.7)


def test_truncate_after_purges_tensorboard_steps(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:
        for r in (1, 2, 3):
            w.write(make_record(r))
    with MetricsWriter(tmp_path) as w:  # resume from round 1
        w.truncate_after(1)
        w.write(make_record(2, metric=0.25))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Scalars("hexa/metric")
    assert [e.step for e in scalars] == [1, 2]
    assert scalars[1].value == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def test_summary_table_has_one_row_per_record() -> None:
    records = [make_record(r) for r in (1, 2, 3)] + [make_record(4, agg_error=None, local_metric=None)]
    table = summary_table(records, "hexa run")
    assert table.row_count == len(records)
    assert table.title == "hexa run"
    headers = [str(c.header) for c in table.columns]
    assert "Accuracy" in headers and "Local accuracy" in headers
    cells = {str(c.header): list(c.cells) for c in table.columns}
    assert cells["Round"] == ["1", "2", "3", "4"]
    assert cells["Agg. error"][0] == "1.0e-08"
    assert cells["Agg. error"][3] == "—" and cells["Local accuracy"][3] == "—"
    assert cells["MB up"][0] == "1.00"


def test_compare_markdown_one_row_per_method_with_error_stats() -> None:
    runs = fake_runs()
    md = compare_markdown(runs)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(runs)
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[1] == "Final accuracy" and header[2] == "Best accuracy"
    rows = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == set(runs)

    # fedavg: errors 0.1, 0.2, 0.6 -> mean 0.3, max 0.6
    assert rows["fedavg"][4] == "3.0e-01" and rows["fedavg"][5] == "6.0e-01"
    # ffa: 2e-9, 4e-9 -> mean 3e-9, max 4e-9
    assert rows["ffa"][4] == "3.0e-09" and rows["ffa"][5] == "4.0e-09"
    # hexa: 0, 3e-16, 0 -> mean 1e-16, max 3e-16
    assert rows["hexa"][4] == "1.0e-16" and rows["hexa"][5] == "3.0e-16"

    fedavg = rows["fedavg"]
    assert fedavg[1] == "0.8000"  # final metric (round 3)
    assert fedavg[2] == "0.8000"  # best metric
    assert fedavg[3] == "0.7000"  # final eval loss
    assert fedavg[6] == "3.00" and fedavg[7] == "6.00"  # 3 rounds x 1 MB up, 2 MB down
    assert fedavg[8] == "50.0"  # last cumulative wall time
    assert rows["ffa"][8] == "40.0"


def test_compare_markdown_handles_missing_values_and_lower_is_better() -> None:
    runs = {
        "a": [{"round": 1, "metric_name": "perplexity", "metric": 9.0}, {"round": 2, "metric": 12.0}],
        "b": [],
    }
    rows = compare_markdown(runs).strip().splitlines()
    assert "Best perplexity" in rows[0]
    a = [c.strip() for c in rows[2].strip("|").split("|")]
    assert a[1] == "12.0000" and a[2] == "9.0000"  # best perplexity is the lowest
    assert a[4] == "—" and a[8] == "—"
    assert rows[3].count("—") == 8
    assert higher_is_better("accuracy") and not higher_is_better("eval_loss")


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_writes_pngs(tmp_path: Path) -> None:
    records = fake_runs()["hexa"]  # includes exact-zero errors: must still plot on a log axis
    paths = plot_run(records, tmp_path / "plots")
    assert [p.name for p in paths] == ["metric.png", "agg_error.png"]
    for p in paths:
        assert_png(p)


def test_plot_run_with_no_optional_data(tmp_path: Path) -> None:
    paths = plot_run([{"round": 1}, {"round": 2, "metric": None}], tmp_path)
    for p in paths:
        assert_png(p)


def test_plot_compare_writes_pngs(tmp_path: Path) -> None:
    paths = plot_compare(fake_runs(), tmp_path)
    assert [p.name for p in paths] == ["compare_metric.png", "compare_agg_error.png", "compare_bytes.png"]
    for p in paths:
        assert_png(p)


def test_floor_is_positive_and_tiny() -> None:
    assert 0 < AGG_ERROR_FLOOR <= 1e-16 and math.isfinite(math.log10(AGG_ERROR_FLOOR))


def test_reopening_purges_tensorboard_rounds_missing_from_jsonl(tmp_path: Path) -> None:
    """Resume as the engine does it: truncate without TensorBoard, then reopen with it."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path) as w:
        for r in (1, 2, 3):
            w.write(make_record(r))
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.truncate_after(1)
    with MetricsWriter(tmp_path) as w:
        w.write(make_record(2, metric=0.25))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    scalars = acc.Scalars("hexa/metric")
    assert [e.step for e in scalars] == [1, 2]
    assert scalars[1].value == pytest.approx(0.25)
