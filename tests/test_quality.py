"""Sample-quality measures (dfkd.loop.quality) against hand computations."""
import numpy as np
import pytest
import torch
from scipy import linalg

from dfkd.loop.quality import SampleQuality, diversity, frechet_distance, prdc
from dfkd.nets.models import create_model
from dfkd.nets.taps import embed


def test_frechet_distance_matches_the_closed_form_on_small_gaussians():
    rng = np.random.default_rng(0)
    real = rng.normal(0.0, 1.0, size=(400, 3))
    fake = rng.normal([1.0, -0.5, 0.0], [2.0, 0.5, 1.0], size=(300, 3)) @ np.array([[1, 0.3, 0], [0, 1, 0], [0, 0, 1]])
    mu1, mu2 = real.mean(0), fake.mean(0)
    s1, s2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(torch.tensor(real), torch.tensor(fake)) == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(torch.tensor(real), torch.tensor(real)) == pytest.approx(0.0, abs=1e-6)


def test_prdc_by_hand_on_points_of_a_line():
    # real at 0..5 on a line: with k = 1 each real point's radius is 1 (its neighbour)
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0]])
    fake = torch.tensor([[0.5], [2.0], [10.0], [11.0]])  # two inside the real balls, two far away
    out = prdc(real, fake, k=1)
    assert out["precision"] == 0.5
    # 0.5 lies in the balls of 0 and 1; 2.0 in those of 1, 2 and 3: density = (2 + 3) / (1 x 4)
    assert out["density"] == 1.25
    # real points with a fake sample inside their ball: 0, 1, 2, 3
    assert out["coverage"] == pytest.approx(4 / 6)
    # fake radii (k = 1): 0.5 -> 1.5, 2.0 -> 1.5, 10 -> 1, 11 -> 1; real points within them: 0, 1, 2, 3
    assert out["recall"] == pytest.approx(4 / 6)


def test_diversity_is_the_mean_pairwise_distance():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert diversity(points) == pytest.approx((5 + 4 + 3) / 3)


def test_the_embedding_is_the_input_of_the_last_linear_layer_and_quality_compares_to_real():
    torch.manual_seed(0)
    teacher = create_model("lenet5", 1, 10, 32).eval()
    x = torch.randn(20, 1, 32, 32)
    by_hand = x
    for name, module in teacher.named_children():
        if name == "fc2":
            break
        by_hand = module(by_hand)
    features, logits = embed(teacher, x)
    assert features.shape == (20, 84) and torch.allclose(features, by_hand.detach())
    assert torch.allclose(logits, teacher(x).detach())
    quality = SampleQuality(lambda images: embed(teacher, images), x)
    same = quality(x)
    assert same["quality/teacher_fid"] == pytest.approx(0.0, abs=1e-6) and same["quality/precision"] == 1.0
    assert same["quality/diversity"] == pytest.approx(same["quality/diversity_real"])
    assert SampleQuality(lambda images: embed(teacher, images), None)(x).keys() == {"quality/diversity"}  # no real data: diversity alone
