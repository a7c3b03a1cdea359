"""Each official metric under its own name, and the mean of several under a name that says it is a mean.

Hand-computed case from the issue: on 1,000 pairs of which 684 are positive, a model that predicts the
positive class everywhere has F1 = 2*684/(2*684+316) = 0.8124 and accuracy 0.684; their mean 0.7482 must
be called ``mean(f1,accuracy)``, never ``f1``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedlora.data import primary_score, score_name
from fedlora.sim.data import metric_values, score


def _one_class_everywhere():
    labels = torch.tensor([1] * 684 + [0] * 316)
    logits = torch.tensor([[0.0, 1.0]] * 1000)
    return logits, labels


def test_a_pair_task_reports_f1_and_accuracy_by_name_and_their_mean_as_a_mean():
    logits, labels = _one_class_everywhere()
    data = SimpleNamespace(metric="f1", num_labels=2)
    values = metric_values(data, logits, labels)
    assert values == {"f1": pytest.approx(1368 / 1684), "accuracy": pytest.approx(0.684)}
    assert score_name(values) == "mean(f1,accuracy)"
    assert score(data, logits, labels) == pytest.approx((1368 / 1684 + 0.684) / 2)


def test_a_single_metric_keeps_its_own_name():
    logits, labels = _one_class_everywhere()
    values = metric_values(SimpleNamespace(metric="matthews_corrcoef", num_labels=2), logits, labels)
    assert values == {"matthews_corrcoef": 0.0} and score_name(values) == "matthews_corrcoef"
    assert primary_score({"accuracy": 0.5}) == 0.5 and score_name({"accuracy": 0.5}) == "accuracy"


def test_stsb_reports_pearson_and_spearman():
    preds = torch.tensor([[1.0], [2.0], [3.0], [5.0]])
    gold = torch.tensor([1.0, 2.0, 4.0, 3.0])
    values = metric_values(SimpleNamespace(metric="pearson_spearman", num_labels=1), preds, gold)
    assert set(values) == {"pearson", "spearman"} and score_name(values) == "mean(pearson,spearman)"
    assert values["spearman"] == pytest.approx(0.8)  # ranks 1,2,3,4 vs 1,2,4,3: 1 - 6*2/(4*15)
