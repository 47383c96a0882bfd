"""Stability statistics on cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from mlra_mega.metrics.stability import (SpikeDetector, grad_variance, group_of, moments, spearman,
                                         variance_from_moments)


def test_groups_of_parameter_names() -> None:
    assert group_of("embedding.word_embeddings.weight") == "embedding"
    assert group_of("decoder.layers.0.self_attention.linear_a.weight") == "layer_00"
    assert group_of("module.decoder.layers.11.mlp.linear_fc1.bias") == "layer_11"
    assert group_of("decoder.final_layernorm.weight") == "final_norm"
    assert group_of("output_layer.weight") == "output"


def test_gradient_variance_by_hand() -> None:
    # g1 = [1, 2], g2 = [3, 6]: mean [2, 4]; ||g1 - mean||^2 = ||g2 - mean||^2 = 5; / numel 2 = 2.5
    g = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    by_definition = float(((g - g.mean(0)) ** 2).sum(1).mean() / 2)
    assert by_definition == 2.5
    assert grad_variance(float((g ** 2).sum()), 2, float((g.mean(0) ** 2).sum()), 2) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="two micro-batches"):
        grad_variance(1.0, 1, 1.0, 2)


def test_moments_give_the_population_variance() -> None:
    x = torch.randn(7, 3, 5) * 3 + 1
    assert variance_from_moments(moments(x)) == pytest.approx(float(x.double().var(unbiased=False)), rel=1e-12)
    assert variance_from_moments(moments(x[:3]) + moments(x[3:])) == pytest.approx(
        float(x.double().var(unbiased=False)), rel=1e-12)  # shards add up


def test_spike_detector_scores_counts_and_resumes() -> None:
    d = SpikeDetector(window=10, threshold=4.0, min_history=5)
    scores = [d.update(x) for x in [2.0, 2.1, 1.9, 2.0, 2.1]]
    assert scores == [None] * 5 and d.spikes == 0
    calm = d.update(2.05)
    assert abs(calm) < 1 and d.spikes == 0
    z = d.update(5.0)
    mean = sum([2.0, 2.1, 1.9, 2.0, 2.1, 2.05]) / 6
    std = math.sqrt(sum((x - mean) ** 2 for x in [2.0, 2.1, 1.9, 2.0, 2.1, 2.05]) / 6)
    assert z == pytest.approx((5.0 - mean) / std) and d.spikes == 1
    again = SpikeDetector(window=10, threshold=4.0, min_history=5)
    again.load_state_dict(d.state_dict())
    assert again.update(2.0) == d.update(2.0) and again.spikes == 1


def test_spearman() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 2, 3], [5, 5, 5]) is None
