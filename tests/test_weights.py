"""Class/image weights against hand-computed values, and the statistics of the weighted draw."""

import random

import numpy as np
import pytest

from trainer.data.weights import (
    class_counts,
    class_weights,
    draw_counts,
    draw_indices,
    epoch_class_weights,
    image_weights,
)


def _labels(*class_lists):
    return [np.array([[c, 0.5, 0.5, 0.1, 0.1] for c in cl], np.float32).reshape(-1, 5) for cl in class_lists]


# img0: classes 0, 0, 1; img1: 1; img2: background; img3: 0. nc = 3, class 2 has no label.
LABELS = _labels([0, 0, 1], [1], [], [0])


def test_class_weights_by_hand():
    assert class_counts(LABELS, 3).tolist() == [3, 2, 0]
    # 1 / [3, 2, 1] = [1/3, 1/2, 1], sum 11/6
    np.testing.assert_allclose(class_weights(LABELS, 3), [2 / 11, 3 / 11, 6 / 11])


def test_image_weights_by_hand():
    cw = class_weights(LABELS, 3)
    # img0: 2 * 2/11 + 3/11; background: 0
    np.testing.assert_allclose(image_weights(LABELS, 3, cw), [7 / 11, 3 / 11, 0, 2 / 11])


def test_epoch_class_weights():
    cw = np.array([2 / 11, 3 / 11, 6 / 11])
    np.testing.assert_allclose(epoch_class_weights(cw, np.array([0.5, 0.0, 1.0])), [2 / 11 / 4, 3 / 11, 0])
    with pytest.raises(ValueError, match="shape"):
        epoch_class_weights(cw, np.zeros(2))


def test_degenerate_inputs():
    np.testing.assert_allclose(class_weights(_labels([], []), 2), [0.5, 0.5])  # no labels at all
    assert image_weights([], 2, np.array([0.5, 0.5])).shape == (0,)
    with pytest.raises(ValueError, match="out of range"):
        class_weights(_labels([3]), 3)
    with pytest.raises(ValueError, match="nc=3"):
        image_weights(LABELS, 3, np.ones(2))
    with pytest.raises(ValueError):
        draw_indices(np.array([1.0, -1.0]), 2, 0, 0)
    with pytest.raises(ValueError):
        draw_indices(np.array([]), 2, 0, 0)


def test_draw_indices_matches_random_choices_and_is_deterministic():
    w = image_weights(LABELS, 3, class_weights(LABELS, 3))
    got = draw_indices(w, 4, seed=5, epoch=3)
    assert got.dtype == np.int64 and got.shape == (4,)
    # The reference is YOLOv5's own draw, written out: random.choices over the image weights
    # (YOLOv5: random.choices(range(n), weights=iw, k=n)), with cumulative weights and bisect.
    ref_rng, cum = random.Random("5-3"), np.cumsum(w).tolist()
    expected = [int(np.searchsorted(cum, ref_rng.random() * cum[-1], side="right")) for _ in range(4)]
    assert got.tolist() == expected
    np.testing.assert_array_equal(got, draw_indices(w, 4, seed=5, epoch=3))
    many = [draw_indices(w, 50, seed=5, epoch=e) for e in range(3)]
    assert not np.array_equal(many[0], many[1]) and not np.array_equal(many[1], many[2])
    assert 2 not in np.concatenate(many)  # the background image has weight 0 (YOLOv5 behaviour)


def test_all_zero_weights_fall_back_to_uniform():
    got = draw_indices(np.zeros(4), 4000, seed=0, epoch=0)
    counts = np.bincount(got, minlength=4)
    assert counts.sum() == 4000 and (np.abs(counts - 1000) < 4 * np.sqrt(4000 * 0.25 * 0.75)).all()


def test_draw_counts():
    assert draw_counts([0, 0, 3, 2], LABELS, 3).tolist() == [5, 2, 0]
    assert draw_counts([], LABELS, 3).tolist() == [0, 0, 0]


def test_rare_class_oversampling_matches_expected_proportion():
    rng = np.random.default_rng(0)
    n = 4000
    rare = np.zeros(n, bool)
    rare[rng.choice(n, size=n // 20, replace=False)] = True  # the rare class sits in 5% of images
    class_lists = [[1] + [0] * int(rng.integers(0, 3)) if r else [0] * int(rng.integers(1, 4)) for r in rare]
    labels = _labels(*class_lists)
    cw = class_weights(labels, 2)
    w = image_weights(labels, 2, cw)
    p = w[rare].sum() / w.sum()  # exact expected share of draws landing on rare images
    assert p > 0.3  # the weighting really over-samples the 5%
    k = 200_000
    idx = draw_indices(w, k, seed=0, epoch=0)
    frac = rare[idx].mean()
    assert abs(frac - p) < 4 * np.sqrt(p * (1 - p) / k)  # 4 sigma of a binomial share
    # The per-class record agrees with the drawn images.
    assert draw_counts(idx, labels, 2)[1] == rare[idx].sum()
