"""Small configs whose metric records were recorded before the round protocol replaced the flat engine loop.

``golden_records.json`` beside this file holds them (times dropped). It was written by running
``python tests/runtime/golden_configs.py OUT.json`` on the commit before the change; the test
``test_behaviour_unchanged.py`` runs the same configs on today's code and compares.
"""

from __future__ import annotations

# name -> extra overrides on top of engine_fixtures.tiny_overrides(model, data, out, method, rounds)
GOLDEN = {
    "hexa": ("hexa", 3, []),
    "hexa_hetero_ranks": ("hexa", 3, ["lora.client_ranks=[4, 2, 3]", "federation.method_options.proximal_mu=0.1"]),
    "fra_ffa_after": ("fra", 3, ["federation.method_options.fold_tail=true", "federation.method_options.ffa_after=1",
                                 "train.optimizer_state=kept"]),
}


def record_golden(out_json: str) -> None:
    import json
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from engine_fixtures import TIMING_KEYS, make_sentiment_tsv, make_tiny_bert, tiny_overrides

    from fedlora.config import load_config
    from fedlora.sim.engine import Simulation

    root = Path(tempfile.mkdtemp())
    model, data = make_tiny_bert(root / "tiny-bert"), make_sentiment_tsv(root / "train.tsv")
    golden = {}
    for name, (method, rounds, extra) in GOLDEN.items():
        cfg = load_config(None, [*tiny_overrides(model, data, root / name, method, rounds), *extra])
        records = Simulation(cfg).run()
        golden[name] = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
    Path(out_json).write_text(json.dumps(golden, indent=1))


if __name__ == "__main__":
    import sys

    record_golden(sys.argv[1])
