"""Tests for ljax/data.py: Fashion-MNIST IDX decoding, the shared pipeline, TFDS mocks, missing data."""

import gzip
import os
import time

import numpy as np
import pytest

from ljax import data

REAL_FASHION_DIR = data.FASHION_MNIST_DIR
N_TRAIN, N_TEST = 100, 37


# ------------------------------------------------------------------------------------------ helpers


def _write_idx(path, array, *, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(
        int(d).to_bytes(4, 'big') for d in array.shape
    )
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    with gzip.open(path, 'wb') if compress else open(path, 'wb') as f:
        f.write(payload)


def _fake_fashion(n):
    """Images whose first two pixels spell the example index; label = index % 10."""
    index = np.arange(n)
    images = np.random.default_rng(n).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = index % 256, index // 256
    return images, (index % 10).astype(np.uint8)


def _indices(x):
    """Example indices back from normalised Fashion-MNIST batches (inverts the normalisation)."""
    raw = np.rint((x[..., 0] * 0.3530 + 0.2860) * 255).astype(np.int64)
    return raw[:, 0, 0] + 256 * raw[:, 0, 1]


@pytest.fixture(scope='module')
def fashion_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp('fashion')
    for split, n in (('train', N_TRAIN), ('test', N_TEST)):
        images, labels = _fake_fashion(n)
        image_file, label_file = data._FASHION_FILES[split]
        _write_idx(directory / image_file, images)
        _write_idx(directory / label_file, labels)
    return str(directory)


def _collect(iterator):
    return [tuple(np.array(a) for a in batch) for batch in iterator]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------------------- info / IDX


def test_dataset_info_needs_no_data():
    assert data.dataset_info('fashion_mnist') == {'num_classes': 10, 'image_shape': (28, 28, 1)}
    assert data.dataset_info('cifar100') == {'num_classes': 100, 'image_shape': (32, 32, 3)}
    assert data.dataset_info('imagenet2012') == {'num_classes': 1000, 'image_shape': (224, 224, 3)}
    assert data.dataset_info('imagenet2012', image_size=160)['image_shape'] == (160, 160, 3)
    with pytest.raises(ValueError, match='unknown dataset'):
        data.dataset_info('mnist')


def test_idx_round_trip_is_exact(fashion_dir):
    loaded = data.load_fashion_mnist_idx(fashion_dir)
    for split, n in (('train', N_TRAIN), ('test', N_TEST)):
        images, labels = loaded[split]
        expected_images, expected_labels = _fake_fashion(n)
        assert images.dtype == np.uint8 and images.shape == (n, 28, 28, 1)
        assert labels.dtype == np.int64 and labels.shape == (n,)
        np.testing.assert_array_equal(images[..., 0], expected_images)
        np.testing.assert_array_equal(labels, expected_labels)


def test_idx_uncompressed_files_are_read(tmp_path):
    images, labels = _fake_fashion(5)
    for split in ('train', 'test'):
        image_file, label_file = data._FASHION_FILES[split]
        _write_idx(tmp_path / image_file[:-3], images, compress=False)
        _write_idx(tmp_path / label_file[:-3], labels, compress=False)
    np.testing.assert_array_equal(data.load_fashion_mnist_idx(str(tmp_path))['test'][1], labels)


@pytest.mark.parametrize(
    'damage, message',
    [
        ('truncate_gzip', 'corrupt file'),
        ('bad_magic', 'not an IDX file'),
        ('short_payload', 'header says'),
        ('not_gzip', 'corrupt file'),
    ],
)
def test_corrupt_idx_is_a_clear_error(tmp_path, damage, message):
    images, labels = _fake_fashion(10)
    image_file, label_file = data._FASHION_FILES['train']
    _write_idx(tmp_path / label_file, labels)
    path = tmp_path / image_file
    _write_idx(path, images)
    if damage == 'truncate_gzip':
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == 'bad_magic':
        _write_idx(path, images.reshape(10, 784))  # a 2-d IDX where a 3-d one belongs
    elif damage == 'short_payload':
        raw = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(raw[:-28]))
    elif damage == 'not_gzip':
        path.write_bytes(b'this is not gzip')
    with pytest.raises(ValueError, match=message) as info:
        data.get_dataset('fashion_mnist', 'train', batch_size=2, train=True, data_dir=str(tmp_path))
    assert image_file in str(info.value)


def test_mismatched_image_and_label_counts(tmp_path):
    images, labels = _fake_fashion(10)
    image_file, label_file = data._FASHION_FILES['test']
    _write_idx(tmp_path / image_file, images)
    _write_idx(tmp_path / label_file, labels[:9])
    with pytest.raises(ValueError, match='10 images but'):
        data.get_dataset('fashion_mnist', 'test', batch_size=2, train=False, data_dir=str(tmp_path))


# ------------------------------------------------------------------------- Fashion-MNIST pipeline


def test_fashion_train_batches(fashion_dir):
    batches = data.get_dataset(
        'fashion_mnist', 'train', batch_size=16, train=True, data_dir=fashion_dir
    )
    assert (batches.num_examples, batches.batch_size, batches.steps_per_epoch, len(batches)) == (
        N_TRAIN,
        16,
        6,
        6,
    )
    epoch = _collect(batches.epoch(0))
    assert len(epoch) == 6
    for x, y in epoch:
        assert x.dtype == np.float32 and x.shape == (16, 28, 28, 1)
        assert y.dtype == np.int32 and y.shape == (16,)
        assert -0.2860 / 0.3530 - 1e-5 <= x.min() and x.max() <= (1 - 0.2860) / 0.3530 + 1e-5
    seen = np.concatenate([_indices(x) for x, _ in epoch])
    assert len(set(seen)) == 96 and seen.max() < N_TRAIN  # a permutation, remainder dropped
    np.testing.assert_array_equal(np.concatenate([y for _, y in epoch]), seen % 10)
    assert not np.array_equal(seen, np.arange(96))  # shuffled


def test_train_order_depends_only_on_seed_and_epoch(fashion_dir):
    def make(seed=0):
        return data.get_dataset(
            'fashion_mnist', 'train', batch_size=16, train=True, data_dir=fashion_dir, seed=seed
        )

    used = make()
    for _ in range(3):
        _collect(used)  # epochs 0, 1, 2 through __iter__
    _assert_same(_collect(used.epoch(3)), _collect(make().epoch(3)))
    orders = [np.concatenate([_indices(x) for x, _ in make().epoch(e)]) for e in range(2)]
    assert not np.array_equal(orders[0], orders[1])
    other_seed = np.concatenate([_indices(x) for x, _ in make(seed=1).epoch(0)])
    assert not np.array_equal(orders[0], other_seed)


def test_iteration_walks_through_epochs(fashion_dir):
    batches = data.get_dataset(
        'fashion_mnist', 'train', batch_size=16, train=True, data_dir=fashion_dir
    )
    first, second = _collect(batches), _collect(batches)
    _assert_same(first, _collect(batches.epoch(0)))
    _assert_same(second, _collect(batches.epoch(1)))


def test_resume_is_the_tail_of_the_epoch(fashion_dir):
    batches = data.get_dataset(
        'fashion_mnist', 'train', batch_size=16, train=True, data_dir=fashion_dir
    )
    full = _collect(batches.epoch(2))
    _assert_same(_collect(batches.epoch(2, start_step=4)), full[4:])
    assert _collect(batches.epoch(2, start_step=6)) == []
    with pytest.raises(ValueError, match='start_step'):
        batches.epoch(0, start_step=7)


def test_fashion_eval_covers_every_example_once(fashion_dir):
    batches = data.get_dataset(
        'fashion_mnist', 'test', batch_size=16, train=False, data_dir=fashion_dir
    )
    assert (batches.num_examples, batches.steps_per_epoch) == (N_TEST, 3)
    epoch = _collect(batches.epoch(0))
    assert len(epoch) == 3
    for x, y, w in epoch:
        assert x.shape == (16, 28, 28, 1) and y.dtype == np.int32 and w.dtype == np.float32
    weights = np.concatenate([w for _, _, w in epoch])
    np.testing.assert_array_equal(weights, np.r_[np.ones(N_TEST), np.zeros(48 - N_TEST)])
    index = np.concatenate([_indices(x) for x, _, _ in epoch])[:N_TEST]
    np.testing.assert_array_equal(index, np.arange(N_TEST))
    np.testing.assert_array_equal(
        np.concatenate([y for _, y, _ in epoch])[:N_TEST], np.arange(N_TEST) % 10
    )
    _assert_same(_collect(batches.epoch(5, start_step=1)), epoch[1:])  # no shuffling in eval


def test_num_examples_takes_the_first_n(fashion_dir):
    batches = data.get_dataset(
        'fashion_mnist', 'test', batch_size=8, train=False, data_dir=fashion_dir, num_examples=10
    )
    assert (batches.num_examples, batches.steps_per_epoch) == (10, 2)
    index = np.concatenate([_indices(x) for x, _, _ in batches.epoch(0)])[:10]
    np.testing.assert_array_equal(index, np.arange(10))


def test_env_variable_points_at_the_idx_files(fashion_dir, monkeypatch):
    monkeypatch.setenv(data.FASHION_MNIST_ENV, fashion_dir)
    assert (
        data.get_dataset('fashion_mnist', 'test', batch_size=8, train=False).num_examples == N_TEST
    )


def test_process_shards_are_disjoint_and_in_step(fashion_dir, monkeypatch):
    shards = {}
    for index in range(2):
        monkeypatch.setattr(data, '_jax_process', lambda index=index: (index, 2))
        train = data.get_dataset(
            'fashion_mnist', 'train', batch_size=16, train=True, data_dir=fashion_dir
        )
        test = data.get_dataset(
            'fashion_mnist', 'test', batch_size=16, train=False, data_dir=fashion_dir
        )
        assert train.batch_size == 8 and (train.num_examples, train.steps_per_epoch) == (50, 6)
        assert test.steps_per_epoch == 3  # ceil(ceil(37 / 2) / 8) on both processes
        shards[index] = (
            np.concatenate([_indices(x) for x, _ in train.epoch(0)]),
            np.concatenate([_indices(x)[w > 0] for x, _, w in test.epoch(0)]),
        )
    assert not set(shards[0][0]) & set(shards[1][0])
    np.testing.assert_array_equal(np.concatenate([shards[0][1], shards[1][1]]), np.arange(N_TEST))
    with pytest.raises(ValueError, match='multiple'):
        data.get_dataset('fashion_mnist', 'train', batch_size=15, train=True, data_dir=fashion_dir)


def test_global_batches_do_not_depend_on_the_process_count(fashion_dir, monkeypatch):
    """Process p's batch b is rows [8p, 8p+8) of the one-process batch b, also when resuming."""

    def batches(index, count, start_step):
        monkeypatch.setattr(data, '_jax_process', lambda: (index, count))
        train = data.get_dataset(
            'fashion_mnist', 'train', batch_size=16, train=True, data_dir=fashion_dir, seed=3
        )
        return [x for x, _ in train.epoch(1, start_step=start_step)]

    for start_step in (0, 4):
        one = batches(0, 1, start_step)
        two = [batches(0, 2, start_step), batches(1, 2, start_step)]
        assert len(one) == len(two[0]) == len(two[1]) == 6 - start_step
        for b, x in enumerate(one):
            np.testing.assert_array_equal(np.concatenate([two[0][b], two[1][b]]), x)


@pytest.mark.skipif(
    not os.path.isdir(REAL_FASHION_DIR), reason='dataset-fashion-mnist not installed'
)
def test_real_fashion_mnist_files():
    loaded = data.load_fashion_mnist_idx(REAL_FASHION_DIR)
    assert loaded['train'][0].shape == (60000, 28, 28, 1) and loaded['test'][0].shape == (
        10000,
        28,
        28,
        1,
    )
    np.testing.assert_array_equal(np.bincount(loaded['train'][1]), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(loaded['test'][1]), np.full(10, 1000))
    batches = data.get_dataset(
        'fashion_mnist', 'train', batch_size=256, train=True, data_dir=REAL_FASHION_DIR
    )
    assert (batches.num_examples, batches.steps_per_epoch) == (60000, 234)
    x, y = next(iter(batches))
    assert abs(x.mean()) < 0.1 and abs(x.std() - 1) < 0.1


# --------------------------------------------------------------------------------- missing data


def _assert_one_line_fast(call, started, *needles):
    with pytest.raises(data.DatasetNotFoundError) as info:
        call()
    message = str(info.value)
    assert '\n' not in message and all(n in message for n in needles), message
    assert time.monotonic() - started < 30


def test_missing_fashion_mnist(tmp_path):
    started = time.monotonic()
    _assert_one_line_fast(
        lambda: data.get_dataset(
            'fashion_mnist', 'train', batch_size=8, train=True, data_dir=str(tmp_path)
        ),
        started,
        'Fashion-MNIST not found',
        str(tmp_path),
        'apt-get install dataset-fashion-mnist',
        data.FASHION_MNIST_ENV,
    )
    with pytest.raises(data.DatasetNotFoundError):
        data.load_fashion_mnist_idx(str(tmp_path))


def test_missing_cifar_without_network(tmp_path, monkeypatch):
    monkeypatch.setattr(data, '_network_available', lambda url: False)  # the same on any machine
    started = time.monotonic()
    _assert_one_line_fast(
        lambda: data.get_dataset(
            'cifar10', 'train', batch_size=8, train=True, data_dir=str(tmp_path)
        ),
        started,
        'cifar10',
        str(tmp_path),
        'download_and_prepare',
    )


def test_missing_imagenet_names_the_manual_files(tmp_path):
    started = time.monotonic()
    _assert_one_line_fast(
        lambda: data.get_dataset(
            'imagenet2012', 'test', batch_size=8, train=False, data_dir=str(tmp_path)
        ),
        started,
        'ILSVRC2012_img_train.tar',
        'ILSVRC2012_img_val.tar',
        os.path.join('downloads', 'manual'),
    )


def test_network_probe_fails_fast():
    started = time.monotonic()
    assert not data._network_available(
        'https://ljax-test.invalid/file.tar.gz'
    )  # .invalid never resolves
    assert time.monotonic() - started < data._NETWORK_PROBE_S + 2


# ---------------------------------------------------------------------------- TFDS (mocked) data

N_MOCK = 50


@pytest.fixture
def mock_tfds(monkeypatch):
    tfds = data._tfds()
    # Mocked builders report "not prepared"; their download_and_prepare is a no-op that needs no network.
    monkeypatch.setattr(data, '_network_available', lambda url: True)
    with tfds.testing.mock_data(num_examples=N_MOCK):
        yield tfds


def _bounds(name):
    mean, std = (np.array(v) for v in data.MEAN_STD[name])
    return (0 - mean) / std - 1e-4, (1 - mean) / std + 1e-4


def _check_train(batches, shape, name):
    assert (
        batches.num_examples == N_MOCK and batches.steps_per_epoch == N_MOCK // batches.batch_size
    )
    epoch = _collect(batches.epoch(0))
    assert len(epoch) == batches.steps_per_epoch
    low, high = _bounds(name)
    for x, y in epoch:
        assert x.dtype == np.float32 and x.shape == (batches.batch_size, *shape)
        assert (
            y.dtype == np.int32
            and 0 <= y.min()
            and y.max() < data.dataset_info(name)['num_classes']
        )
        assert np.all(x >= low) and np.all(x <= high)
    _assert_same(epoch, _collect(batches.epoch(0)))
    _assert_same(_collect(batches.epoch(1, start_step=2)), _collect(batches.epoch(1))[2:])
    assert not np.array_equal(epoch[0][0], _collect(batches.epoch(1))[0][0])
    return epoch


def _check_eval(batches, shape):
    epoch = _collect(batches.epoch(0))
    steps = -(-N_MOCK // batches.batch_size)
    assert len(epoch) == batches.steps_per_epoch == steps
    for x, y, w in epoch:
        assert (
            x.shape == (batches.batch_size, *shape)
            and y.dtype == np.int32
            and w.dtype == np.float32
        )
    weights = np.concatenate([w for _, _, w in epoch])
    np.testing.assert_array_equal(
        weights, np.r_[np.ones(N_MOCK), np.zeros(steps * batches.batch_size - N_MOCK)]
    )
    return epoch


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_cifar_mocked(mock_tfds, name):
    train = data.get_dataset(
        name, 'train', batch_size=8, train=True, data_dir='/nonexistent', seed=3
    )
    _check_train(train, (32, 32, 3), name)
    again = data.get_dataset(
        name, 'train', batch_size=8, train=True, data_dir='/nonexistent', seed=3
    )
    _assert_same(_collect(train.epoch(4)), _collect(again.epoch(4)))

    test = data.get_dataset(name, 'test', batch_size=8, train=False)
    epoch = _check_eval(test, (32, 32, 3))
    raw = mock_tfds.as_numpy(mock_tfds.builder(name).as_dataset(split='test', batch_size=N_MOCK))
    raw = next(iter(raw))
    mean, std = (np.array(v, np.float32) * 255 for v in data.MEAN_STD[name])
    x = np.concatenate([x for x, _, _ in epoch])[:N_MOCK]
    np.testing.assert_allclose(
        x, (raw['image'] - mean) / std, atol=1e-5
    )  # in order, no augmentation
    np.testing.assert_array_equal(np.concatenate([y for _, y, _ in epoch])[:N_MOCK], raw['label'])


def test_cifar_augmentation_is_pad_crop_flip(mock_tfds):
    x, y = next(data.get_dataset('cifar10', 'train', batch_size=N_MOCK, train=True).epoch(0))
    raw = next(
        iter(
            mock_tfds.as_numpy(
                mock_tfds.builder('cifar10').as_dataset(split='train', batch_size=N_MOCK)
            )
        )
    )
    mean, std = (np.array(v) * 255 for v in data.MEAN_STD['cifar10'])
    pixels = np.rint(x * std + mean).astype(np.int64)  # back to 0..255
    padded = np.pad(raw['image'].astype(np.int64), ((0, 0), (4, 4), (4, 4), (0, 0)))
    sources, moves = [], set()
    for image, label in zip(pixels, y):
        found = [
            (k, dy, dx, flip)
            for flip in (False, True)
            for dy in range(9)
            for dx in range(9)
            for k in np.flatnonzero(
                np.all(
                    padded[:, dy : dy + 32, dx : dx + 32][:, :, :: -1 if flip else 1] == image,
                    axis=(1, 2, 3),
                )
            )
        ]
        assert found, 'a train image is not a padded crop (maybe flipped) of any original'
        k, dy, dx, flip = found[0]
        assert raw['label'][k] == label
        sources.append(k)
        moves.add((dy, dx, flip))
    assert sorted(sources) == list(range(N_MOCK))  # every example once
    assert len(moves) > 5 and {m[2] for m in moves} == {False, True}


def test_imagenet_mocked(mock_tfds):
    train = data.get_dataset(
        'imagenet2012', 'train', batch_size=10, train=True, image_size=32, seed=1
    )
    _check_train(train, (32, 32, 3), 'imagenet2012')
    test = data.get_dataset('imagenet2012', 'test', batch_size=16, train=False, image_size=32)
    epoch = _check_eval(test, (32, 32, 3))
    _assert_same(epoch, _collect(test.epoch(0)))
    low, high = _bounds('imagenet2012')
    real = np.concatenate([x for x, _, _ in epoch])[:N_MOCK]
    assert np.all(real >= low) and np.all(real <= high)


def test_fashion_falls_back_to_prepared_tfds(mock_tfds, tmp_path, monkeypatch):
    monkeypatch.setattr(mock_tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
    batches = data.get_dataset(
        'fashion_mnist', 'test', batch_size=16, train=False, data_dir=str(tmp_path)
    )
    assert batches.num_examples == N_MOCK
    x, y, w = next(batches.epoch(0))
    assert x.shape == (16, 28, 28, 1) and y.dtype == np.int32
