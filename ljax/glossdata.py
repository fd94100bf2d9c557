"""WordNet glosses as token batches for the MiniLM job (`model='minilm'`, `dataset='wordnet_glosses'`).

`load_glosses(...)` -> `Glosses`: the search split (synsets `wordnet.split` keeps) and the held-out
split (never seen by the search), each drawn in a seeded order, tokenised once.
`batches(ids, ...)` -> `ljax.data.Batches` of int32 token ids, 0-padded: train batches `(x, y)`
(y zeros: the search is label-free), eval batches `(x, y, w)` (y the supersense, w 1 real / 0 pad).

Lengths: glosses have up to ~140 tokens but a median of 16, so rows are cut at `max_len` tokens and
grouped by length into a few widths (`bucket_widths`): every batch holds rows of one width, so few
shapes compile and little of each batch is padding. A train epoch shuffles every width's rows with
(seed, epoch), cuts them into full batches (a width's remainder sits the epoch out) and shuffles
the batch order, so `epoch(e, start_step)` replays an epoch exactly (resume).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from ljax import wordnet
from ljax.data import Batches

CLS, SEP = 101, 102  # BERT's [CLS] and [SEP] ids (all-MiniLM-L6-v2's vocab.txt)


def bucket_widths(max_len: int) -> tuple[int, ...]:
    """The batch widths for rows cut at max_len tokens: those of 16, 24, 32, 48, 64, 96, 128, 192
    below max_len, then max_len."""
    if max_len < 2:
        raise ValueError(f'max_seq_length: {max_len} leaves no room for [CLS] and [SEP]')
    return tuple(w for w in (16, 24, 32, 48, 64, 96, 128, 192) if w < max_len) + (max_len,)


@dataclasses.dataclass
class Split:
    """One side of the split: token ids (n, max_len) int32 (0-padded) and supersenses (n,)."""

    ids: np.ndarray
    labels: np.ndarray

    def take(self, n: int | None) -> 'Split':
        return self if n is None else Split(self.ids[:n], self.labels[:n])

    def sha256(self) -> str:
        h = hashlib.sha256(np.ascontiguousarray(self.ids).tobytes())
        h.update(np.ascontiguousarray(self.labels, np.int32).tobytes())
        return h.hexdigest()


@dataclasses.dataclass
class Glosses:
    search: Split  # every search-split gloss, in a seeded order (subsets take its first rows)
    held_out: Split  # every held-out gloss, in a seeded order


def load_glosses(tokenizer, max_len: int, *, path=None, held_out: float = 0.1, seed: int = 0):
    """Both splits of WordNet's glosses (`wordnet.split(held_out, seed)`), each permuted by a
    seeded generator, tokenised and cut at `max_len` tokens (`bert.tokenize`)."""
    from ljax.models.bert import tokenize

    search, held = wordnet.split(wordnet.load_glosses(path), held_out=held_out, seed=seed)

    def side(glosses, purpose):
        order = np.random.default_rng([seed, purpose]).permutation(len(glosses))
        texts = [glosses[i].text for i in order]
        labels = np.array([glosses[i].lexfile for i in order], np.int32)
        return Split(tokenize(tokenizer, texts, max_len, length=max_len), labels)

    return Glosses(side(search, 0), side(held, 1))


def lengths(ids: np.ndarray) -> np.ndarray:
    return (np.asarray(ids) != 0).sum(axis=1)


def _widths_of(ids: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    """Index into `widths` of the narrowest width that holds each row."""
    return np.searchsorted(np.asarray(widths), lengths(ids), side='left')


def batches(
    split: Split, batch_size: int, widths: tuple[int, ...], *, train: bool, seed: int = 0
) -> Batches:
    """`Batches` of `split` (module docstring). Eval batches visit every row once, in order of
    width then position; the last batch of each width is padded with empty rows of weight 0."""
    ids, labels = np.asarray(split.ids), np.asarray(split.labels)
    if ids.shape[1] > widths[-1]:
        raise ValueError(f'glosses: rows of {ids.shape[1]} tokens, wider than {widths[-1]}')
    bucket = _widths_of(ids, widths)
    groups = [np.flatnonzero(bucket == b) for b in range(len(widths))]
    if train:
        steps = sum(len(g) // batch_size for g in groups)
        if steps == 0:
            raise ValueError(
                f'glosses: {len(ids)} search glosses make no full batch of {batch_size} of one '
                'length; use more glosses (train_examples) or a smaller batch_size'
            )
    else:
        steps = sum(-(-len(g) // batch_size) for g in groups)

    def make_epoch(epoch, start_step):
        if train:
            rng = np.random.default_rng([seed, epoch, 7])
            plan = []
            for b, g in enumerate(groups):
                rows = rng.permutation(g)
                full = len(rows) // batch_size * batch_size
                plan += [(b, r) for r in rows[:full].reshape(-1, batch_size)]
            plan = [plan[i] for i in rng.permutation(len(plan))]
        else:
            plan = [
                (b, g[i : i + batch_size]) for b, g in enumerate(groups)
                for i in range(0, len(g), batch_size)
            ]
        for b, rows in plan[start_step:]:
            x = np.zeros((batch_size, widths[b]), np.int32)
            x[: len(rows)] = ids[rows, : widths[b]]
            if train:
                yield x, np.zeros(batch_size, np.int32)
            else:
                y = np.zeros(batch_size, np.int32)
                y[: len(rows)] = labels[rows]
                w = np.zeros(batch_size, np.float32)
                w[: len(rows)] = 1.0
                yield x, y, w

    return Batches(
        num_examples=len(ids),
        batch_size=batch_size,
        steps_per_epoch=steps,
        _make_epoch=make_epoch,
        layout_independent=True,
        total_examples=len(ids),
        content_sha256=split.sha256(),
    )


def eval_order(split: Split, batch_size: int, widths: tuple[int, ...]) -> np.ndarray:
    """The rows in the order eval `batches` yields them (weight-1 rows only)."""
    bucket = _widths_of(split.ids, widths)
    return np.concatenate([np.flatnonzero(bucket == b) for b in range(len(widths))])


def packed(split: Split, count: int, width: int) -> np.ndarray:
    """int32 (count, width) calibration sequences with no padding: the glosses' tokens, in
    order, concatenated ([CLS] a [SEP] b [SEP] ...) and cut into windows of width - 2 tokens, each
    framed by [CLS] and [SEP] (calibration statistics then see no pad rows)."""
    body = width - 2
    stream: list[int] = []
    for row in split.ids:
        stream.extend(int(t) for t in row[1 : lengths(row[None])[0]])  # drop [CLS], keep [SEP]
        if len(stream) >= count * body:
            break
    if len(stream) < count * body:
        raise ValueError(
            f'calibration: the search split holds {len(stream)} tokens, fewer than {count} '
            f'sequences of {width}'
        )
    out = np.empty((count, width), np.int32)
    out[:, 0], out[:, -1] = CLS, SEP
    out[:, 1:-1] = np.asarray(stream[: count * body], np.int32).reshape(count, body)
    return out
