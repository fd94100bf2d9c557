"""ljax.glossdata: length buckets, resumable label-free train batches, padded eval batches and
packed calibration sequences."""

import numpy as np
import pytest

from ljax import glossdata


def _split(n=300, seed=0, max_len=64):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, max_len + 1, n)
    ids = np.zeros((n, max_len), np.int32)
    for i, k in enumerate(lengths):
        ids[i, 0], ids[i, k - 1] = glossdata.CLS, glossdata.SEP
        ids[i, 1 : k - 1] = rng.integers(1000, 2000, k - 2)
    return glossdata.Split(ids, rng.integers(0, 45, n).astype(np.int32))


def test_bucket_widths():
    assert glossdata.bucket_widths(64) == (16, 24, 32, 48, 64)
    assert glossdata.bucket_widths(40) == (16, 24, 32, 40)
    assert glossdata.bucket_widths(8) == (8,)
    with pytest.raises(ValueError, match='no room'):
        glossdata.bucket_widths(1)


def test_train_batches_are_full_one_width_and_replay_exactly():
    split, widths = _split(), glossdata.bucket_widths(64)
    b = glossdata.batches(split, 8, widths, train=True, seed=3)
    epoch = list(b.epoch(1))
    assert len(epoch) == b.steps_per_epoch == len(b)
    seen = []
    for x, y in epoch:
        assert x.shape[0] == 8 and x.shape[1] in widths and not y.any()
        n = (x != 0).sum(1)
        assert (n <= x.shape[1]).all() and (n > ([0] + list(widths))[widths.index(x.shape[1])]).all()
        # every row is a whole search-split row (nothing cut, nothing padded in)
        for row in x:
            matches = np.flatnonzero((split.ids[:, : x.shape[1]] == row).all(1))
            assert len(matches) and not split.ids[matches[0], x.shape[1] :].any()
            seen.append(matches[0])
    assert len(set(seen)) == len(seen) > 300 - 8 * len(widths)  # each width drops < one batch
    # resume: the tail of the epoch from step 5 is the same batches; another epoch another order
    tail = list(b.epoch(1, start_step=5))
    assert all(np.array_equal(p[0], q[0]) for p, q in zip(tail, epoch[5:]))
    assert len(tail) == len(epoch) - 5
    other = list(b.epoch(2))
    assert not all(np.array_equal(p[0], q[0]) for p, q in zip(other, epoch) if p[0].shape == q[0].shape)
    with pytest.raises(ValueError, match='no full batch'):
        glossdata.batches(split.take(5), 8, widths, train=True)


def test_eval_batches_cover_every_row_once_in_eval_order():
    split, widths = _split(50), glossdata.bucket_widths(64)
    b = glossdata.batches(split, 8, widths, train=False)
    rows, labels = [], []
    for x, y, w in b.epoch(0):
        real = w > 0
        assert not x[~real].any() and not y[~real].any()
        rows += list(x[real])
        labels.append(y[real])
    order = glossdata.eval_order(split, 8, widths)
    assert sorted(order.tolist()) == list(range(50)) and len(rows) == 50
    for r, i in zip(rows, order):
        np.testing.assert_array_equal(r, split.ids[i, : len(r)])
    np.testing.assert_array_equal(np.concatenate(labels), split.labels[order])
    assert len(b) == sum(1 for _ in b.epoch(0))


def test_packed_sequences_concatenate_glosses_without_padding():
    split = _split(40)
    out = glossdata.packed(split, 5, 32)
    assert out.shape == (5, 32) and out.dtype == np.int32 and (out != 0).all()
    assert (out[:, 0] == glossdata.CLS).all() and (out[:, -1] == glossdata.SEP).all()
    stream = [t for row in split.ids for t in row[1 : (row != 0).sum()]]
    np.testing.assert_array_equal(out[:, 1:-1].reshape(-1), stream[: 5 * 30])
    with pytest.raises(ValueError, match='fewer than'):
        glossdata.packed(split.take(2), 50, 32)
