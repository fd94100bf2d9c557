"""ljax.embeddings: cosine, neighbour agreement and the supersense probe on hand-made cases."""

import numpy as np
import pytest

from ljax import embeddings


def test_mean_cosine():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    b = np.array([[2.0, 0.0], [1.0, 0.0], [-3.0, -4.0]])  # scale-free: 1, orthogonal: 0, opposite: -1
    assert embeddings.mean_cosine(a, b) == pytest.approx(0.0)
    assert embeddings.mean_cosine(a[:1], b[:1]) == pytest.approx(1.0)
    assert embeddings.mean_cosine(a, a * 5) == pytest.approx(1.0)
    with pytest.raises(ValueError, match='same shape'):
        embeddings.mean_cosine(a, b[:2])


def test_nearest_excludes_the_query_and_breaks_ties_by_index():
    # Points on a circle at angles 0, 10, 25, 90, 180 degrees.
    angles = np.deg2rad([0, 10, 25, 90, 180])
    x = np.stack([np.cos(angles), np.sin(angles)], 1)
    nn = embeddings.nearest(x, 2)
    assert nn.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
    # Row 0 equally close to rows 1 and 2 (both copies): the lower index first.
    tied = np.array([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [-1.0, 0.0]])
    assert embeddings.nearest(tied, 1)[0].tolist() == [1]
    with pytest.raises(ValueError, match='k: expected'):
        embeddings.nearest(x, 5)


def test_nn_agreement_on_a_hand_made_case():
    # Two tight clusters of 3 on a line, far apart; k = 2 neighbours are each point's cluster.
    a = np.array([[1.0, 0.0], [1.0, 0.01], [1.0, 0.02], [0.0, 1.0], [0.01, 1.0], [0.02, 1.0]])
    assert embeddings.nn_agreement(a, a, k=2) == 1.0
    assert embeddings.nn_agreement(a, a * 3.0, k=2) == 1.0  # cosine neighbours: scale-free
    # Swap the embeddings of points 2 and 3: points 2 and 3 now sit in the other cluster.
    b = a[[0, 1, 3, 2, 4, 5]]
    # Each query's 2 nearest under a and under b, by hand:
    nn_a = {0: {1, 2}, 1: {0, 2}, 2: {1, 0}, 3: {4, 5}, 4: {3, 5}, 5: {4, 3}}
    nn_b = {0: {1, 3}, 1: {0, 3}, 2: {4, 5}, 3: {1, 0}, 4: {2, 5}, 5: {4, 2}}
    want = np.mean([len(nn_a[i] & nn_b[i]) / 2 for i in range(6)])
    assert want == pytest.approx(1 / 3)
    assert embeddings.nn_agreement(b, a, k=2) == pytest.approx(want)


def test_probe_separates_separable_classes_and_scores_other_embeddings():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 3
    labels = rng.integers(0, 5, 600)
    x = centres[labels] + rng.normal(size=(600, 16)) * 0.3
    probe = embeddings.Probe.fit(x[:400], labels[:400], num_classes=7)  # 2 classes never seen
    assert probe.w.shape == (16, 7) and probe.b.shape == (7,)
    assert probe.accuracy(x[400:], labels[400:]) == 1.0
    # The same probe on embeddings that lost the class structure: near chance (1/5).
    noise = rng.normal(size=(200, 16))
    assert probe.accuracy(noise, labels[400:]) < 0.5
    # Deterministic: the same fit twice.
    again = embeddings.Probe.fit(x[:400], labels[:400], num_classes=7)
    np.testing.assert_array_equal(again.w, probe.w)
    with pytest.raises(ValueError, match='labels outside'):
        embeddings.Probe.fit(x[:10], labels[:10] + 10, num_classes=7)
