"""Time and bytes to a target, from hand-made records (hand-computed sums)."""

from __future__ import annotations

from fedlora.report_costs import auto_target, cost_curve, plot_costs, targets_markdown, time_to_target

A = [{"round": r, "metric": m, "sim_round_s": 10.0 * r, "bytes_up": 1_000_000, "bytes_down": 2_000_000}
     for r, m in ((1, 0.5), (2, 0.7), (3, 0.65), (4, 0.9))]
B = [{"round": r, "metric": m, "sim_time_s": t, "bytes_up": 0, "bytes_down": 500_000}
     for r, m, t in ((1, 0.6, 5.0), (2, 0.8, 12.0), (3, 0.75, 20.0))]


def test_the_first_round_at_the_target_and_its_cumulative_costs():
    hit = time_to_target(A, 0.7)
    assert hit == {"round": 2, "metric": 0.7, "sim_s": 10.0 + 20.0, "bytes": 6_000_000.0}
    assert time_to_target(A, 0.95) is None
    assert time_to_target(B, 0.7) == {"round": 2, "metric": 0.8, "sim_s": 12.0, "bytes": 1_000_000.0}
    loss = [{"round": 1, "metric": 2.0, "sim_time_s": 1.0}, {"round": 2, "metric": 1.0, "sim_time_s": 3.0}]
    assert time_to_target(loss, 1.5, higher=False)["round"] == 2
    assert [p["sim_s"] for p in cost_curve(A)] == [10.0, 30.0, 60.0, 100.0]


def test_the_auto_target_is_one_every_run_reached_and_the_table_shows_it(tmp_path):
    runs = {"a": A, "b": B}
    assert auto_target(runs, higher=True) == 0.8
    table = targets_markdown(runs)
    assert "0.8000 (the lowest best over these runs)" in table
    row_a = next(line for line in table.splitlines() if line.startswith("| a "))
    assert "| 4 |" in row_a and f"{100 / 3600:.4g}" in row_a and "| 12.00 |" in row_a
    names = {p.name for p in plot_costs(runs, tmp_path, target=0.8)}
    assert names == {"compare_metric_vs_time.png", "compare_metric_vs_bytes.png"}
