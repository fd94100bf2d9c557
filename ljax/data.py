"""Input pipelines: one split of Fashion-MNIST, CIFAR-10/100 or ImageNet as numpy batches.

`get_dataset` returns a `Batches`: train batches are `(x, y)`, eval batches `(x, y, w)`, with x float32
NHWC normalised, y int32 and w float32 (1 real, 0 padding). Train order and augmentation depend only on
`(seed, epoch)`, so `batches.epoch(e, start_step=s)` replays the tail of epoch e exactly (resume).

Sources: Fashion-MNIST from IDX files (Debian `dataset-fashion-mnist`) or a prepared TFDS copy;
CIFAR and ImageNet from TFDS. Fashion-MNIST and CIFAR are held in memory and shuffled with a full
numpy permutation drawn from (seed, epoch); global batch b is the slice [b*B, (b+1)*B) of it, and
process p takes its rows [p*B/P, (p+1)*B/P) of every global batch, with augmentation seeded by the
global position: the sequence of global batches does not depend on the number of processes or
devices (`Batches.layout_independent`), so a run can resume on another layout. ImageNet streams
from TFDS (`tfds.split_for_jax_process`) with seeded file shuffling and a seeded shuffle buffer, whose
order, like any seeded tf op, also depends on TF's global seed (ljax never sets it). From decoded
examples on, every dataset goes through the same augment / batch / normalise code.

TensorFlow is imported lazily, kept off any GPU, and only produces numpy arrays. It and TFDS are the
`data` extra (`pip install 'ljax[data]'`); without them `get_dataset` raises
MissingDataDependencyError.
Every dataset, Fashion-MNIST from IDX files included, goes through tf.data (batching, padding,
normalisation, CIFAR augmentation); only the IDX decoding is numpy.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import socket
import threading
import urllib.parse
from typing import Callable, Iterator

import numpy as np

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_ENV = 'LJAX_FASHION_MNIST_DIR'
_FASHION_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}

# Per-channel mean / std as fractions of 255 (the values the usual PyTorch checkpoints were trained with).
MEAN_STD = {
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_NUM_CLASSES = {'fashion_mnist': 10, 'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000}
_IMAGE_SHAPE = {'fashion_mnist': (28, 28, 1), 'cifar10': (32, 32, 3), 'cifar100': (32, 32, 3)}
_TFDS_SPLIT = {'imagenet2012': {'train': 'train', 'test': 'validation'}}
IMAGENET_IMAGE_SIZE = 224
_CROP_PADDING = (
    32  # Inception fallback centre crop keeps image_size / (image_size + 32) of the short side
)
_NETWORK_PROBE_S = 5.0


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk nor obtainable; the message is one line saying how to get it."""


DATA_EXTRA = "pip install 'ljax[data]' (in a checkout: pip install -e '.[data]')"


class MissingDataDependencyError(ModuleNotFoundError):
    """TensorFlow / TFDS (the `data` extra) are not installed; the message is one line naming the
    install command. The library (`search_jackpot`) needs neither, only these pipelines do."""


def _missing_dependency(e: ModuleNotFoundError) -> MissingDataDependencyError:
    return MissingDataDependencyError(
        f"the data pipelines need TensorFlow and TensorFlow Datasets (no module named "
        f"'{e.name}'): {DATA_EXTRA}",
        name=e.name,
    )


@dataclasses.dataclass
class Batches:
    """One split as re-iterable numpy batches; `for batch in batches` runs epoch 0, then 1, 2, ...

    num_examples: examples in this process's share of the split (train, in memory: the split's size
        / processes, drawn afresh from every global batch each epoch).
    batch_size: examples per batch in this process (the global batch / `jax.process_count()`).
    steps_per_epoch: train: num_examples // batch_size (remainder dropped); eval: enough padded batches
        to cover every example once (the same count on every process).
    """

    num_examples: int
    batch_size: int
    steps_per_epoch: int
    _make_epoch: Callable[[int, int], Iterator[tuple]] = dataclasses.field(repr=False)
    # True when the global batches depend on (seed, epoch) only, not on the number of processes
    layout_independent: bool = True
    total_examples: int | None = None  # in the whole split (all processes)
    content_sha256: str | None = None  # of the whole split's images and labels (in-memory data)
    _next_epoch: int = dataclasses.field(default=0, repr=False)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple]:
        """Batches start_step, start_step + 1, ... of `epoch`, identical to an uninterrupted run."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f'start_step={start_step} outside [0, {self.steps_per_epoch}]')
        return self._make_epoch(int(epoch), int(start_step))

    def __iter__(self):
        epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        return self.epoch(epoch)

    def __len__(self):
        return self.steps_per_epoch


def dataset_info(name: str, *, image_size: int | None = None) -> dict:
    """{'num_classes': int, 'image_shape': (H, W, C)} of the batches `get_dataset` yields; reads no data."""
    _check_name(name)
    if name == 'imagenet2012':
        size = image_size or IMAGENET_IMAGE_SIZE
        shape = (size, size, 3)
    else:
        shape = _IMAGE_SHAPE[name]
    return {'num_classes': _NUM_CLASSES[name], 'image_shape': shape}


def get_dataset(
    name: str,
    split: str,
    *,
    batch_size: int,
    train: bool,
    data_dir: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    num_examples: int | None = None,
) -> Batches:
    """Batches of one split ('train' or 'test'; 'test' is ImageNet's 'validation').

    batch_size is the GLOBAL batch: with several JAX processes each process gets its own shard of the
    split and batches of batch_size // jax.process_count() (it must divide). train=True shuffles,
    augments and drops the remainder; train=False keeps order and pads the last batch (weight 0).
    num_examples keeps only the first N examples of the split (before sharding). data_dir: the
    TFDS data directory, or for Fashion-MNIST the directory with the IDX files (see `load_fashion_mnist_idx`).
    image_size: ImageNet output side (default 224); other datasets keep their native size.
    Raises DatasetNotFoundError when the data is missing and cannot be obtained.
    """
    _check_name(name)
    if split not in ('train', 'test'):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    process_index, process_count = _jax_process()
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f'batch_size={batch_size} must be a positive multiple of the {process_count} processes'
        )
    local_batch = batch_size // process_count
    tf = _tf()
    if name == 'imagenet2012':
        return _streaming_batches(
            name,
            split,
            train=train,
            data_dir=data_dir,
            seed=seed,
            image_size=image_size or IMAGENET_IMAGE_SIZE,
            num_examples=num_examples,
            local_batch=local_batch,
            process=(process_index, process_count),
        )
    images, labels = _load_in_memory(name, split, data_dir=data_dir, num_examples=num_examples)
    total = len(labels)
    digest = hashlib.sha256(np.ascontiguousarray(images).reshape(-1).view(np.uint8))
    digest.update(np.ascontiguousarray(labels, np.int64).reshape(-1).view(np.uint8))
    example_fn = _cifar_augment if (train and name.startswith('cifar')) else None
    if train:
        steps = _steps(total, total, batch_size, 1, True)
        mine = slice(process_index * local_batch, (process_index + 1) * local_batch)
    else:
        start, stop = _process_slice(total, process_index, process_count, drop_remainder=False)
        images, labels = images[start:stop], labels[start:stop]
        steps = _steps(len(labels), total, local_batch, process_count, False)

    def examples(epoch, start_step):
        if not train:
            return tf.data.Dataset.from_tensor_slices((np.arange(len(labels)), images, labels))
        # A full permutation drawn by numpy from (seed, epoch) alone, cut into global batches;
        # this process's rows of each. Resuming is slicing it; positions are global.
        order = _rng(seed, epoch, 'shuffle').permutation(total)[: steps * batch_size]
        order = order.reshape(steps, batch_size)[start_step:, mine].reshape(-1)
        positions = np.arange(steps * batch_size).reshape(steps, batch_size)
        positions = positions[start_step:, mine].reshape(-1)
        return tf.data.Dataset.from_tensor_slices((positions, images[order], labels[order]))

    batches = _batches(
        name,
        examples,
        example_fn,
        num_examples=total // process_count if train else len(labels),
        local_batch=local_batch,
        steps=steps,
        train=train,
        seed=seed,
    )
    batches.total_examples, batches.content_sha256 = total, digest.hexdigest()
    return batches


def load_fashion_mnist_idx(directory: str = FASHION_MNIST_DIR) -> dict:
    """{'train': (images, labels), 'test': (images, labels)} from the four IDX files in `directory`.

    images uint8 (N, 28, 28, 1), labels int64 (N,). Files may be gzipped (`*.gz`, as Debian ships them)
    or not. Missing files raise DatasetNotFoundError; a corrupt or truncated file raises ValueError.
    """
    return {split: _read_fashion_split(directory, split) for split in _FASHION_FILES}


# ----------------------------------------------------------------------------------------- sources


def _load_in_memory(name, split, *, data_dir, num_examples):
    """(images uint8 NHWC, labels int64) of the first num_examples of the split, in split order."""
    if name == 'fashion_mnist':
        directory = data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR
        if all(_idx_path(directory, f) for f in _FASHION_FILES[split]):
            images, labels = _read_fashion_split(directory, split)
            return images[:num_examples], labels[:num_examples]
        builder = _tfds_builder(name, data_dir)
        if not builder.is_prepared():
            raise DatasetNotFoundError(
                f'Fashion-MNIST not found in {directory}: install it with `apt-get install '
                f'dataset-fashion-mnist` or set {FASHION_MNIST_ENV} / data_dir'
            )
    else:
        builder = _prepared_builder(name, data_dir)
    ds = builder.as_dataset(split=_split_string(name, split, num_examples), shuffle_files=False)
    if num_examples is not None:
        ds = ds.take(num_examples)
    ds = ds.map(lambda ex: (ex['image'], ex['label'])).batch(8192)
    parts = list(_tfds().as_numpy(ds))
    if not parts:
        raise ValueError(f'{name} {split} is empty')
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return images, labels


def _streaming_batches(
    name, split, *, train, data_dir, seed, image_size, num_examples, local_batch, process
):
    tfds = _tfds()
    builder = _prepared_builder(name, data_dir)
    split_str = _split_string(name, split, num_examples)
    if process[1] > 1:
        split_str = tfds.split_for_jax_process(
            split_str, process_index=process[0], process_count=process[1], drop_remainder=train
        )
    local = _cardinality(builder.as_dataset(split=split_str), num_examples)
    total = (
        local
        if process[1] == 1
        else _cardinality(
            builder.as_dataset(split=_split_string(name, split, num_examples)), num_examples
        )
    )
    steps = _steps(local, total, local_batch, process[1], train)
    decoders = {'image': tfds.decode.SkipDecoding()}
    example_fn = (_imagenet_train_fn if train else _imagenet_eval_fn)(image_size)

    def examples(epoch, start_step):
        read_config = tfds.ReadConfig(
            shuffle_seed=_int_seed(seed, epoch, 'files') if train else None
        )
        ds = builder.as_dataset(
            split=split_str, shuffle_files=train, decoders=decoders, read_config=read_config
        )
        ds = ds.take(local).map(lambda ex: (ex['image'], ex['label']))
        if train:
            buffer = min(local, max(16 * local_batch, 10_000))
            ds = ds.shuffle(
                buffer, seed=_int_seed(seed, epoch, 'shuffle'), reshuffle_each_iteration=False
            )
        # Position within the epoch first, then skip: decoding happens later, so skipped examples cost little.
        ds = ds.enumerate().skip(start_step * local_batch if train else 0)
        return ds.map(lambda i, example: (i, example[0], example[1]))

    batches = _batches(
        name,
        examples,
        example_fn,
        num_examples=local,
        local_batch=local_batch,
        steps=steps,
        train=train,
        seed=seed,
    )
    # Files and shuffle buffers are per process: the global batches depend on the process count.
    batches.layout_independent = False
    batches.total_examples = total
    return batches


def _prepared_builder(name, data_dir):
    """A TFDS builder whose data is prepared, downloading it if possible; DatasetNotFoundError if not."""
    builder = _tfds_builder(name, data_dir)
    if builder.is_prepared():
        return builder
    root = os.path.dirname(os.path.dirname(builder.data_dir))
    if name == 'imagenet2012':
        manual = os.path.join(root, 'downloads', 'manual')
        hint = (
            f'ImageNet is not prepared in {root}: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar '
            f'in {manual}/ (the TFDS manual_dir) and run again'
        )
    else:
        hint = (
            f'{name} is not prepared in {root} and could not be downloaded: with internet run '
            f"`tfds.builder('{name}', data_dir='{root}').download_and_prepare()` (or copy a prepared "
            f'{root}/{name}/ from another machine)'
        )
    # TFDS retries a dead network for minutes: probe first. ImageNet downloads nothing (manual files).
    urls = [] if name == 'imagenet2012' else list(getattr(builder, 'url_infos', None) or {})
    if urls and not _network_available(urls[0]):
        raise DatasetNotFoundError(hint + ' [no network]')
    try:
        builder.download_and_prepare()
    except Exception as e:  # no network, manual files missing (AssertionError), bad checksums...
        if isinstance(e, ModuleNotFoundError) and e.name == 'importlib_resources':
            raise _missing_dependency(e) from e  # TFDS imports it only here and does not declare it
        # The AssertionError about ImageNet's manual files only repeats the hint; others may say more.
        detail = (str(e).splitlines() or [''])[0][:200]
        cause = '' if isinstance(e, AssertionError) else f' [{type(e).__name__}: {detail}]'
        raise DatasetNotFoundError(hint + cause) from e
    return builder


def _network_available(url):
    """True when the host of `url` accepts a TCP connection within a few seconds (DNS included)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == 'https' else 80)
    result = []

    def probe():
        try:
            socket.create_connection((parsed.hostname, port), timeout=_NETWORK_PROBE_S).close()
            result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(_NETWORK_PROBE_S)
    return bool(result)


def _read_fashion_split(directory, split):
    image_name, label_name = _FASHION_FILES[split]
    paths = [_idx_path(directory, f) for f in (image_name, label_name)]
    if not all(paths):
        missing = [f for f, p in zip((image_name, label_name), paths) if not p]
        raise DatasetNotFoundError(
            f'Fashion-MNIST not found in {directory} (missing {", ".join(missing)}): install it with '
            f'`apt-get install dataset-fashion-mnist` or set {FASHION_MNIST_ENV} / data_dir'
        )
    images = _read_idx(paths[0], ndim=3)
    labels = _read_idx(paths[1], ndim=1).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise ValueError(f'{paths[0]}: images are {images.shape[1:]}, expected (28, 28)')
    if len(images) != len(labels):
        raise ValueError(
            f'{paths[0]} has {len(images)} images but {paths[1]} has {len(labels)} labels'
        )
    if labels.size and labels.max() > 9:
        raise ValueError(f'{paths[1]}: label {labels.max()} outside 0..9')
    return images[..., None], labels


def _idx_path(directory, gz_name):
    """Path of `gz_name` in directory, or of its uncompressed twin; None when neither exists."""
    for name in (gz_name, gz_name[: -len('.gz')]):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _read_idx(path, *, ndim):
    """Decode an IDX file of unsigned bytes (magic 0x0000 08 ndim, big-endian int32 dims, data)."""
    try:
        if path.endswith('.gz'):
            with gzip.open(path, 'rb') as f:
                raw = f.read()
        else:
            with open(path, 'rb') as f:
                raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError; a truncated gzip raises EOFError
        raise ValueError(f'{path}: corrupt file ({e})') from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise ValueError(
            f'{path}: not an IDX file of {ndim}-d unsigned bytes (magic {raw[:4].hex() or "missing"})'
        )
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], '>u4'))
    expected = math.prod(dims)
    if len(raw) - header != expected:
        raise ValueError(
            f'{path}: header says {dims} = {expected} bytes of data, file has {len(raw) - header}'
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# -------------------------------------------------------------------------------- shared pipeline


def _batches(name, examples, example_fn, *, num_examples, local_batch, steps, train, seed):
    """Wraps `examples(epoch, start_step)` -> Dataset of (position, image, label) into a Batches.

    example_fn(image, seed) augments / resizes one image (None: batch the images as they are);
    normalisation runs afterwards on whole batches.
    """
    tf, tfds = _tf(), _tfds()
    mean, std = (np.array(v, np.float32) * 255 for v in MEAN_STD[name])
    padding = steps * local_batch - num_examples

    def normalise(x):
        return (tf.cast(x, tf.float32) - mean) / std

    def make_epoch(epoch, start_step):
        ds = examples(epoch, start_step)
        parallel = tf.data.AUTOTUNE
        if train:
            if example_fn is not None:
                aug_seed = tf.constant(
                    _rng(seed, epoch, 'augment').integers(0, 2**31, size=2), tf.int64
                )
                fold_in = tf.random.experimental.stateless_fold_in
                ds = ds.map(
                    lambda i, image, label: (i, example_fn(image, fold_in(aug_seed, i)), label),
                    num_parallel_calls=parallel,
                )
            ds = ds.batch(local_batch, drop_remainder=True).take(steps - start_step)
            ds = ds.map(
                lambda i, x, y: (normalise(x), tf.cast(y, tf.int32)), num_parallel_calls=parallel
            )
        else:
            if example_fn is not None:
                ds = ds.map(
                    lambda i, image, label: (i, example_fn(image, None), label),
                    num_parallel_calls=parallel,
                )
            # Padding examples carry position -1, which becomes weight 0.
            pad = tuple(
                tf.fill(spec.shape, tf.constant(-1 if k == 0 else 0, spec.dtype))
                for k, spec in enumerate(ds.element_spec)
            )
            ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(padding))
            ds = ds.batch(local_batch).skip(start_step)
            ds = ds.map(
                lambda i, x, y: (normalise(x), tf.cast(y, tf.int32), tf.cast(i >= 0, tf.float32)),
                num_parallel_calls=parallel,
            )
        options = tf.data.Options()
        options.deterministic = True
        ds = ds.with_options(options).prefetch(tf.data.AUTOTUNE)
        yield from tfds.as_numpy(ds)

    return Batches(
        num_examples=num_examples,
        batch_size=local_batch,
        steps_per_epoch=steps,
        _make_epoch=make_epoch,
    )


def _cifar_augment(image, seed):
    """Pad 4 with zeros, random 32x32 crop, random horizontal flip (uint8 in, uint8 out)."""
    tf = _tf()
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(image, [32, 32, 3], seed=crop_seed)
    return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _imagenet_train_fn(size):
    """JPEG bytes -> Inception random-resized crop (area 0.08..1, aspect 3/4..4/3) + flip, float 0..255."""
    tf = _tf()

    def fn(image_bytes, seed):
        box_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        shape = tf.image.extract_jpeg_shape(image_bytes)
        begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=box_seed,
            min_object_covered=0.1,
            aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0),
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        # The sampler returns the whole image when it fails: fall back to a centre crop, as Inception does.
        failed = tf.reduce_all(tf.equal(crop_size[:2], shape[:2]))
        side = tf.cast(
            size / (size + _CROP_PADDING) * tf.cast(tf.reduce_min(shape[:2]), tf.float32), tf.int32
        )
        center = tf.stack([(shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side])
        window = tf.where(
            failed, center, tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
        )
        image = tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)
        image = tf.image.resize(image, [size, size], method='bilinear', antialias=True)
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
        return tf.ensure_shape(image, [size, size, 3])

    return fn


def _imagenet_eval_fn(size):
    """JPEG bytes -> resize the shorter side to size*256/224, centre crop size x size, float 0..255."""
    tf = _tf()
    resize_to = int(round(size * 256 / 224))

    def fn(image_bytes, _):
        image = tf.image.decode_jpeg(image_bytes, channels=3)
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        short, long_ = tf.minimum(h, w), tf.maximum(h, w)
        new_long = resize_to * long_ // short  # torchvision Resize(int) truncates the long side
        new_h, new_w = tf.where(h <= w, resize_to, new_long), tf.where(h <= w, new_long, resize_to)
        image = tf.image.resize(image, tf.stack([new_h, new_w]), method='bilinear', antialias=True)
        top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2), tf.int32)
        return tf.ensure_shape(image[top : top + size, left : left + size], [size, size, 3])

    return fn


# ------------------------------------------------------------------------------------------ helpers


def _steps(local, total, local_batch, process_count, train):
    if train:
        if local < local_batch:
            raise ValueError(f'{local} examples are fewer than one batch of {local_batch}')
        return local // local_batch
    # Every process runs as many eval steps as the largest shard needs, so collectives stay in step.
    return math.ceil(math.ceil(total / process_count) / local_batch)


def _process_slice(n, index, count, *, drop_remainder):
    """[start, stop) of process `index` in n examples split contiguously, like `tfds.even_splits`."""
    per, extra = divmod(n, count)
    if drop_remainder:
        return index * per, (index + 1) * per
    start = index * per + min(index, extra)
    return start, start + per + (index < extra)


def _split_string(name, split, num_examples):
    tfds_split = _TFDS_SPLIT.get(name, {}).get(split, split)
    return tfds_split if num_examples is None else f'{tfds_split}[:{int(num_examples)}]'


def _cardinality(ds, num_examples):
    n = int(ds.cardinality())
    if n < 0:
        n = sum(1 for _ in ds)
    return n if num_examples is None else min(n, num_examples)


_PURPOSES = {'shuffle': 0, 'augment': 1, 'files': 2}


def _rng(seed, epoch, purpose):
    """A numpy Generator that depends only on (seed, epoch, purpose): independent streams per purpose."""
    return np.random.default_rng([int(seed) % 2**64, int(epoch), _PURPOSES[purpose]])


def _int_seed(seed, epoch, purpose):
    return int(_rng(seed, epoch, purpose).integers(0, 2**31))


def _check_name(name):
    if name not in _NUM_CLASSES:
        raise ValueError(f'unknown dataset {name!r}; expected one of {sorted(_NUM_CLASSES)}')


def _jax_process():
    import jax

    return jax.process_index(), jax.process_count()


def _tfds_builder(name, data_dir):
    return _tfds().builder(name, data_dir=data_dir)


def _tf():
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    # tf.data only shuffles and normalises here; without this TF prints its oneDNN notice on import
    os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
    try:
        import tensorflow as tf
    except ModuleNotFoundError as e:
        raise _missing_dependency(e) from e

    try:
        tf.config.set_visible_devices([], 'GPU')  # the GPU belongs to JAX
    except RuntimeError:  # TF already initialised its devices: nothing to change now
        pass
    return tf


def _tfds():
    _tf()
    try:
        import tensorflow_datasets as tfds
    except ModuleNotFoundError as e:
        raise _missing_dependency(e) from e

    return tfds
