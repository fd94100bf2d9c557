"""The main job behind `main.py`: search (default), pretrain and evaluate, driven by a config.

A run lives in its workdir: config.json (a rerun with another config is refused), orbax
checkpoints/ (rerunning the same command resumes from the latest complete one), tb/ (TensorBoard),
and at the end jackpot.npz (masked params, batch_stats, mask, scores) and results.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
from ljax import cache, checkpoints, convert, data, report, textjob
from ljax import loop as loop_lib
from ljax import config as config_lib
from ljax import workdir as workdir_lib
from ljax import sparsity as sparsity_lib
from ljax.models import get_model
from ljax.parallel import AXIS_NAME, Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions

JACKPOT_FILE = 'jackpot.npz'
RESULTS_FILE = 'results.json'
TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_model(config):
    kwargs = dict(config_lib.get(config, 'model_kwargs') or {})
    if config_lib.get(config, 'sync_bn'):
        kwargs['bn_axis_name'] = AXIS_NAME
    return get_model(config.model, config.num_classes, **kwargs)


def sample_input(config) -> np.ndarray:
    shape = data.dataset_info(config.dataset, image_size=config_lib.get(config, 'image_size'))[
        'image_shape'
    ]
    return np.zeros((1,) + tuple(shape), np.float32)


def _cache_path(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(
        f'{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}'.encode()
    ).hexdigest()[:16]
    return os.path.join(cache.root(), f'{os.path.basename(path)}.{key}.npz')


def load_pretrained(path: str, arch: str) -> dict:
    """Variables from our .npz, or from a PyTorch file (.pth/.pt/.safetensors) converted once and cached."""
    if not path:
        raise ValueError(
            'pretrained: no checkpoint given; set --config.pretrained=PATH, or train one with '
            '--config.mode=pretrain'
        )
    if path in convert.PRETRAINED_URLS or path.startswith(('http://', 'https://')):
        try:
            path = str(convert.download_pretrained(path, os.path.join(cache.root(), 'downloads')))
        except ValueError:
            raise
        except Exception as e:  # no network, HTTP error
            raise ValueError(
                f'pretrained: cannot download {path} ({type(e).__name__}: {e}); download it '
                'by hand and pass the file with --config.pretrained=PATH'
            ) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'pretrained: no file at {path}; check the path (--config.pretrained=...)'
        )
    try:
        if path.endswith(TORCH_SUFFIXES):
            cached = _cache_path(path)
            if os.path.exists(cached):
                return convert.load_variables_npz(cached)
            variables = convert.from_torch(path, arch)
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            convert.save_variables_npz(variables, cached)
            _log(f'converted {path} -> {cached}')
            return variables
        return convert.load_variables_npz(path)
    except Exception as e:  # unreadable, corrupt, or keys that do not fit the architecture
        reason = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise ValueError(f'pretrained: cannot load {path}: {reason}') from None


def _datasets(config, batch_size):
    common = dict(
        data_dir=config_lib.get(config, 'data_dir'),
        image_size=config_lib.get(config, 'image_size'),
    )
    train = data.get_dataset(
        config.dataset,
        'train',
        batch_size=batch_size,
        train=True,
        seed=config.seed,
        num_examples=config_lib.get(config, 'train_examples'),
        **common,
    )
    test = data.get_dataset(
        config.dataset,
        'test',
        batch_size=config.eval_batch_size,
        train=False,
        num_examples=config_lib.get(config, 'eval_examples'),
        **common,
    )
    return train, test


def _check_batch(batch_size: int, what: str) -> None:
    """The global batch is split across processes, then across each process's local devices."""
    n = jax.local_device_count() * jax.process_count()
    if batch_size % n:
        where = f'{jax.local_device_count()} local devices' + (
            f' x {jax.process_count()} processes' if jax.process_count() > 1 else ''
        )
        raise ValueError(
            f'{what}: {batch_size} does not divide across the {where}; use a multiple of {n}'
        )


def _writer(workdir):
    return ScalarWriter(os.path.join(workdir, 'tb'))


class ScalarWriter:
    """TensorBoard scalars in `logdir`, written with tensorboardX's protos and record writer: no
    TensorFlow (flax's writer needs it). Same calls as flax.metrics.tensorboard.SummaryWriter:
    scalar(tag, value, step), flush(), close(); like it, every scalar is written and flushed in the
    caller's thread (tensorboardX's SummaryWriter queues them for a thread of its own, which would
    hide a full disk from the run). The events carry `simple_value`s: TensorBoard shows them,
    tensorboard's EventAccumulator.Scalars reads them."""

    def __init__(self, logdir: str):
        # tensorboardX imports torch when it is installed (seconds) only to accept torch tensors;
        # ljax writes floats, so torch stays out unless something loaded it already.
        hide_torch = 'torch' not in sys.modules
        if hide_torch:
            sys.modules['torch'] = None  # `import torch` raises ImportError meanwhile
        try:
            from tensorboardX.event_file_writer import EventsWriter
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary
        finally:
            if hide_torch and sys.modules.get('torch', 0) is None:
                del sys.modules['torch']
        self._event, self._summary = Event, Summary
        os.makedirs(logdir, exist_ok=True)
        # events.out.tfevents.<seconds>.<host>.<pid>: a resumed run starts a file of its own
        self._events = EventsWriter(os.path.join(logdir, 'events'), f'.{os.getpid()}')
        self._events.flush()

    def scalar(self, tag: str, value, step: int) -> None:
        summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=float(value))])
        event = self._event(wall_time=time.time(), step=int(step), summary=summary)
        self._events.write_event(event)
        self._events.flush()

    def flush(self) -> None:
        self._events.flush()

    def close(self) -> None:
        self._events.close()


# --------------------------------------------------------------------------------------- search
def parse_nm(text: str):
    """'N:M' -> (N, M); '' -> None."""
    if not text:
        return None
    try:
        n, m = (int(v) for v in str(text).split(':'))
    except ValueError:
        raise ValueError(f"nm: expected 'N:M' such as '2:4', got {text!r}") from None
    return n, m


def _layout(train) -> dict:
    return {
        'processes': jax.process_count(),
        'devices': jax.device_count(),
        'layout_independent': bool(train.layout_independent),
    }


def _check_layout(saved: dict | None, now: dict, sync_bn: bool, workdir: str) -> None:
    """Refuse to resume on another layout where the result would depend on it."""
    if not saved or (saved['processes'], saved['devices']) == (now['processes'], now['devices']):
        return
    if now['layout_independent'] and sync_bn:
        return  # same global batches, BN over the global batch: only float rounding differs
    why = (
        'this dataset streams per process'
        if not now['layout_independent']
        else 'sync_bn=False makes BatchNorm statistics per device'
    )
    raise ValueError(
        f'workdir {workdir} was run on {saved["processes"]} process(es) x {saved["devices"]} '
        f'device(s), now {now["processes"]} x {now["devices"]}; {why}, so resuming would mix two '
        'searches: rerun on the same layout, or use another --workdir'
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _is_writer() -> bool:
    """Only process 0 writes results, exports and logs (checkpoints go through orbax)."""
    return jax.process_index() == 0


def search(config, workdir: str) -> dict:
    """A jackpot search in `workdir` (module docstring). A text model (`textjob.is_text`) runs the
    same search on its glosses, label-free, and is scored by `ljax.textjob` instead of accuracy."""
    _check_batch(config.batch_size, 'batch_size')
    _check_batch(config.eval_batch_size, 'eval_batch_size')
    job = textjob.TextJob(config) if textjob.is_text(config) else None
    if job is None:
        model = build_model(config)
        variables = load_pretrained(config.pretrained, config.model)
        train, test = _datasets(config, config.batch_size)
        sample, calibration = sample_input(config), train.epoch(0)
        calibration_batches = config.calibration_batches
    else:  # an nnx module holding its weights; Wanda calibrates on the job's packed sequences
        model, variables, train, test = job.module, None, job.train, job.test
        sample, calibration = job.sample, job.calibration
        calibration_batches = len(job.calibration)
    total_steps = config.epochs * train.steps_per_epoch
    options = SearchOptions(
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        score_init=config.score_init,
        score_margin=config.score_margin,
        allocation=config.allocation,
        restriction=config.restriction,
        seed=config.seed,
        dtype=config.dtype,
        nm=parse_nm(config_lib.get(config, 'nm')),
        calibration_batches=calibration_batches,
        teacher=config_lib.get(config, 'teacher') or None,
        distill=config_lib.get(config, 'distill'),
        temperature=config_lib.get(config, 'temperature'),
    )
    if not isinstance(config.epochs, int) or config.epochs < 1:
        raise ValueError(f'epochs: expected an integer >= 1, got {config.epochs!r}')
    try:
        search_ = Search.create(
            model,
            variables,
            sample,
            sparsity=config.sparsity,
            total_steps=total_steps,
            options=options,
            calibration=calibration,  # the one-shot Wanda baseline (and Wanda init)
        )
    except ValueError as e:
        if str(e).startswith('variables'):
            raise ValueError(
                f'pretrained: {config.pretrained} does not fit model {config.model!r}: '
                f'{str(e)[len("variables: ") :]}'
            ) from None
        raise
    # Everything is validated before the workdir is touched.
    pinned = variables if job is None else {'params': search_.params}
    identity = workdir_lib.run_identity(config, variables=pinned, train=train, test=test)
    _write_config(workdir, config, identity)
    par = Parallel(search_)
    ckpt = checkpoints.Checkpoints(workdir, config_lib.get(config, 'max_to_keep'))
    state = search_.init_state()
    layout = _layout(train)
    meta: dict[str, Any] = {'wall_seconds': 0.0, 'history': [], 'layout': layout}
    restored = ckpt.restore(search_.checkpointed(state))
    if restored is not None:
        step, state, meta = restored
        state = search_.resumed(state)
        _check_layout(meta.get('layout'), layout, config.sync_bn, workdir)
        meta['layout'] = layout
        done = os.path.join(workdir, RESULTS_FILE)
        if step >= total_steps and os.path.isfile(done):
            ckpt.close()
            with open(done) as f:
                results = json.load(f)
            table = report.text_table if job is not None else report.results_table
            _log(
                f'the run in {workdir} is complete ({step} of {total_steps} steps); its results '
                f'({done}):\n\n{table(results)}\n\n(another --workdir searches again)'
            )
            return results
        _log(f'resumed from step {step} ({workdir})')
    else:
        _log(
            f'searching a {100 * config.sparsity:g}%-sparse jackpot of {config.model} on '
            f'{config.dataset}: {total_steps} steps on {jax.device_count()} device(s)'
            + (f' in {jax.process_count()} processes' if jax.process_count() > 1 else '')
        )
    if job is not None:
        job.prepare(search_)
        if 'baselines' not in meta:
            meta['baselines'] = [job.dense_row()]
            _log(textjob.describe(meta['baselines'][0]))
            if config.baselines:
                meta['baselines'] += job.baselines()
    elif 'dense_accuracy' not in meta:
        _baselines(config, par, search_, train, test, meta)
    step = int(state.step)
    writer = _writer(workdir) if _is_writer() else None
    started = time.time() - meta['wall_seconds']

    def save(step, state_r):
        meta['wall_seconds'] = time.time() - started
        meta['epoch_sums'] = dataclasses.asdict(loop.sums)
        ckpt.save(step, search_.checkpointed(par.unreplicate(state_r)), meta)

    def on_log(step, metrics):
        if writer is None:
            return
        for k in ('loss', 'accuracy', 'flips', 'images_per_second'):
            writer.scalar(f'train/{k}', float(metrics[k]), step)
        writer.scalar('train/restriction_rate', search_.rate(step), step)

    def on_epoch(epoch, state_r, row):
        if job is None:
            _record(row, 'jackpot', par.evaluate_state(test, state_r))
        else:
            scores = job.score_mask(par.unreplicate(state_r.mask))
            row.update({f'jackpot_{k}': v for k, v in scores.items()})
        row['seconds'] = time.time() - started  # since the start of the search, across resumes
        meta['history'].append(row)
        if writer is not None:
            for key in [k for k in row if k.startswith('jackpot_')]:
                writer.scalar(f'eval/{key}', row[key], row['step'])
            writer.flush()
        save(row['step'], state_r)

    loop = loop_lib.Loop(
        par,
        epochs=config.epochs,
        steps_per_epoch=train.steps_per_epoch,
        batch_size=config.batch_size,
        log_every=config_lib.get(config, 'log_every_steps'),
        on_log=on_log,
        on_epoch=on_epoch,
        periodic=[loop_lib.Periodic(config_lib.get(config, 'checkpoint_every_steps'), save)],
        progress=config_lib.get(config, 'progress') and _is_writer(),
        epoch_lines=_is_writer(),
        sums=loop_lib.EpochSums(**meta.get('epoch_sums', {})),
    )
    state_r, _ = loop.run(par.replicate(state), train.epoch, start_step=step)
    ckpt.wait()
    final = par.unreplicate(state_r)
    wall = time.time() - started
    if job is None:
        results = _finish(config, workdir, search_, final, meta, wall)
    else:
        results = _finish_text(config, workdir, job, par, search_, final, meta, wall)
    ckpt.close()
    if writer is not None:
        writer.close()
    return results


def _record(meta: dict, name: str, metrics: dict) -> None:
    meta[f'{name}_accuracy'] = metrics['accuracy']
    if 'top5_accuracy' in metrics:
        meta[f'{name}_top5_accuracy'] = metrics['top5_accuracy']


def _baselines(config, par: Parallel, search_: Search, train, test, meta: dict) -> None:
    """Accuracy of the dense model and of one-shot magnitude and Wanda pruning with no search
    (their N:M forms for an N:M search): with the dense BN statistics, and with them re-estimated
    on `bn_batches` training batches (the fair one-shot baseline: a pruned net's activations no
    longer match the dense statistics)."""
    _record(meta, 'dense', par.evaluate(test, None, search_.batch_stats))
    one_shot = {'magnitude': search_.magnitude}
    if search_.wanda is not None:
        one_shot['wanda'] = search_.wanda
    parts = [f'dense {100 * meta["dense_accuracy"]:.2f}%']
    for name, mask in one_shot.items():
        _record(meta, name, par.evaluate(test, mask, search_.batch_stats))
        part = f'one-shot {name} {100 * meta[f"{name}_accuracy"]:.2f}%'
        if search_.batch_stats is not None:
            stats = par.reestimate_batch_stats(
                train.epoch(0), mask, search_.batch_stats, config.bn_batches
            )
            _record(meta, f'{name}_bn', par.evaluate(test, mask, stats))
            part += f' ({100 * meta[f"{name}_bn_accuracy"]:.2f}% with BN re-estimated)'
        parts.append(part)
    _log(', '.join(parts) + '; no search')
    if search_.wanda_skipped:
        _log(f'one-shot Wanda baseline skipped: {search_.wanda_skipped}')


def _write_config(workdir: str, config, identity: dict) -> None:
    """Process 0 writes (or checks) config.json and the inputs' identity; the others check the
    config once it is there (the identity is the same for all: whole splits, not shards)."""
    if _is_writer():
        checkpoints.check_or_write_config(workdir, config.to_dict(), identity)
    _barrier('config written')
    if not _is_writer():
        checkpoints.check_or_write_config(workdir, config.to_dict())


def _save_jackpot(workdir, search_: Search, final) -> tuple[dict, dict]:
    """(flat mask, jackpot variables) of the final state; process 0 writes jackpot.npz."""
    mask = {n: np.asarray(final.mask[n]) for n in search_.names}
    jackpot = search_.jackpot_variables(mask, final.batch_stats)
    if _is_writer():  # every process holds the same state; one writes it
        convert.save_variables_npz(
            {
                **jax.device_get(jackpot),
                'mask': sparsity_lib.unflatten(mask),
                'scores': sparsity_lib.unflatten(jax.device_get(final.scores)),
            },
            os.path.join(workdir, JACKPOT_FILE),
        )
    return mask, jackpot


def _finish(config, workdir, search_: Search, final, meta, wall) -> dict:
    mask, _ = _save_jackpot(workdir, search_, final)
    magnitude = {n: np.asarray(search_.magnitude[n]) for n in search_.names}
    results = {
        'model': config.model,
        'dataset': config.dataset,
        **{k: v for k, v in meta.items() if k.endswith('accuracy')},
        'jackpot_accuracy': meta['history'][-1]['jackpot_accuracy'] if meta['history'] else None,
        **(
            {'jackpot_top5_accuracy': meta['history'][-1]['jackpot_top5_accuracy']}
            if meta['history'] and 'jackpot_top5_accuracy' in meta['history'][-1]
            else {}
        ),
        'sparsity': report.achieved_sparsity(mask),
        'target_sparsity': config.sparsity,
        'prunable_weights': sum(int(m.size) for m in mask.values()),
        'epochs': config.epochs,
        'steps': int(final.step),
        'wall_seconds': wall,
        'overlap_with_magnitude': report.overlap(mask, magnitude),
        'kept_per_layer': report.kept_per_layer(mask),
        'history': meta['history'],
        'devices': jax.device_count(),
        'processes': jax.process_count(),
        'platform': jax.devices()[0].platform,
        'dtype': config.dtype,
        'nm': config_lib.get(config, 'nm') or None,
        'nonfinite_steps': sum(int(r.get('nonfinite_steps', 0)) for r in meta['history']),
    }
    if _is_writer():
        report.write_json(os.path.join(workdir, RESULTS_FILE), results)
        plots = report.plot_results(results, workdir)
        _log('\n' + report.results_table(results))
        _log(
            f'\nwrote {os.path.join(workdir, JACKPOT_FILE)}, {os.path.join(workdir, RESULTS_FILE)} '
            f'and plots {", ".join(os.path.basename(p) for p in plots)}'
        )
    return results


def _finish_text(config, workdir, job, par, search_: Search, final, meta, wall) -> dict:
    """jackpot.npz, the sentence-transformers export, the step timing, results.json and plots of
    a text search: one row per model (dense, the one-shot baselines, the jackpot)."""
    mask, jackpot = _save_jackpot(workdir, search_, final)
    last = meta['history'][-1] if meta['history'] else {}
    nm = config_lib.get(config, 'nm') or None
    form = nm if nm else f'{100 * config.sparsity:g}% unstructured'
    distill = config_lib.get(config, 'distill')
    how = f'{config.score_init} init' + (', hidden states' if distill == 'hidden' else '')
    how += ', fit to the held-out glosses: in-sample' if job.in_sample else ''
    jackpot_row = {
        'name': f'lottery jackpot {form} ({how})',
        'method': 'jackpot',
        'form': form,
        'score_init': config.score_init,
        'distill': distill,
        'sparsity': report.achieved_sparsity(mask),
        **{k[len('jackpot_'):]: v for k, v in last.items() if k.startswith('jackpot_')},
        'seconds': wall,
    }
    if 'cosine' not in jackpot_row:  # resumed after the last epoch's row: score the mask again
        jackpot_row.update(job.score_mask(mask))
    export_dir = job.export(jackpot['params'], workdir)
    _log(f'timing the search step against a dense forward + backward ({textjob.SPEED_ROUNDS} rounds)')
    speed = job.step_times(par, final)
    results = {
        'model': config.model,
        'dataset': config.dataset,
        'rows': meta['baselines'] + [jackpot_row],
        'neighbours': textjob.NEIGHBOURS,
        'nm': nm,
        'score_init': config.score_init,
        'sparsity': jackpot_row['sparsity'],
        'target_sparsity': 1 - int(nm.split(':')[0]) / int(nm.split(':')[1]) if nm else config.sparsity,
        'prunable_weights': sum(int(m.size) for m in mask.values()),
        'search_glosses': job.train.num_examples,
        'search_split': config_lib.get(config, 'search_glosses'),
        'held_out_glosses': len(job.held_out.ids),
        'probe_glosses': len(job.probe_split.ids),
        'calibration_sequences': sum(len(b) for b in job.calibration),
        'max_seq_length': config.max_seq_length,
        'widths': list(job.widths),
        'batch_size': config.batch_size,
        'lr': config.lr,
        'epochs': config.epochs,
        'steps': int(final.step),
        'wall_seconds': wall,
        'step_time': speed,
        'overlap_with_magnitude': report.overlap(
            mask, {n: np.asarray(search_.magnitude[n]) for n in search_.names}
        ),
        'kept_per_layer': report.kept_per_layer(mask),
        'history': meta['history'],
        'export': export_dir,
        'devices': jax.device_count(),
        'platform': jax.devices()[0].platform,
        'dtype': config.dtype,
        'nonfinite_steps': sum(int(r.get('nonfinite_steps', 0)) for r in meta['history']),
    }
    report.write_json(os.path.join(workdir, RESULTS_FILE), results)
    plots = report.plot_text_results(results, workdir)
    _log('\n' + report.text_table(results))
    _log(
        f'\nwrote {os.path.join(workdir, JACKPOT_FILE)}, {os.path.join(workdir, RESULTS_FILE)}, '
        f'the sentence-transformers model {export_dir} and plots '
        f'{", ".join(os.path.basename(p) for p in plots)}'
    )
    return results


# --------------------------------------------------------------------------------------- evaluate
def evaluate(config, workdir: str) -> dict:
    """Evaluate the exported jackpot (config.jackpot, default workdir/jackpot.npz) on the test split."""
    path = config_lib.get(config, 'jackpot') or os.path.join(workdir, JACKPOT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'evaluate: no jackpot at {path}; run the search first or set --config.jackpot=PATH'
        )
    _check_batch(config.eval_batch_size, 'eval_batch_size')
    saved = workdir_lib.load_npz(path, 'evaluate')
    model = build_model(config)
    variables = {k: saved[k] for k in ('params', 'batch_stats') if k in saved}
    from ljax.search import check_variables

    try:
        check_variables(model, variables, sample_input(config))
    except ValueError as e:
        raise ValueError(f'evaluate: {path} does not fit model {config.model!r}: {e}') from None
    _, test = _datasets(config, config.eval_batch_size)
    search_ = Search.create(model, variables, sample_input(config), sparsity=0.0, total_steps=1)
    par = Parallel(search_)
    metrics = par.evaluate(test, None, variables.get('batch_stats'))
    mask = sparsity_lib.flatten(saved.get('mask', {}))
    out = {
        'accuracy': metrics['accuracy'],
        'loss': metrics['loss'],
        'sparsity': report.achieved_sparsity(mask) if mask else 0.0,
        'jackpot': path,
    }
    top5 = ''
    if 'top5_accuracy' in metrics:
        out['top5_accuracy'] = metrics['top5_accuracy']
        top5 = f', top-5 {100 * out["top5_accuracy"]:.2f}%'
    _log(
        f'{path}: test accuracy {100 * out["accuracy"]:.2f}%{top5}, '
        f'sparsity {100 * out["sparsity"]:.2f}%'
    )
    return out


# --------------------------------------------------------------------------------------- pretrain
def pretrain(config, workdir: str) -> dict:
    """Dense training from scratch (SGD momentum, cosine lr); writes workdir/pretrained.npz."""
    _check_batch(config.batch_size, 'batch_size')
    model = build_model(config)
    train, test = _datasets(config, config.batch_size)
    identity = workdir_lib.run_identity(config, train=train, test=test)
    _write_config(workdir, config, identity)
    epochs = config.pretrain_epochs
    task = DenseTraining(
        model,
        lr=config.pretrain_lr,
        weight_decay=config.pretrain_weight_decay,
        total_steps=epochs * train.steps_per_epoch,
    )
    variables = model.init(jax.random.key(config.seed), sample_input(config), train=False)
    state = task.init_state(variables)
    ckpt = checkpoints.Checkpoints(workdir, config_lib.get(config, 'max_to_keep'))
    meta = {'wall_seconds': 0.0}
    restored = ckpt.restore(state)
    if restored is not None:
        step, state, meta = restored
        _log(f'resumed from step {step} ({workdir})')
    par = Parallel(task)
    started = time.time() - meta['wall_seconds']

    def save(step, state_r):
        meta['wall_seconds'] = time.time() - started
        ckpt.save(step, par.unreplicate(state_r), meta)

    loop = loop_lib.Loop(
        par,
        epochs=epochs,
        steps_per_epoch=train.steps_per_epoch,
        batch_size=config.batch_size,
        log_every=config_lib.get(config, 'log_every_steps'),
        on_epoch=lambda epoch, state_r, row: save(row['step'], state_r),
        progress=config_lib.get(config, 'progress') and _is_writer(),
        epoch_lines=_is_writer(),
        desc='pretrain',
    )
    state_r, _ = loop.run(par.replicate(state), train.epoch, start_step=int(state['step']))
    ckpt.close()
    final = Parallel.unreplicate(state_r)
    variables = {'params': final['params']}
    if final['batch_stats']:
        variables['batch_stats'] = final['batch_stats']
    search_ = Search.create(model, variables, sample_input(config), sparsity=0.0, total_steps=1)
    acc = Parallel(search_).evaluate(test, None, variables.get('batch_stats'))['accuracy']
    out_path = os.path.join(workdir, 'pretrained.npz')
    results = {
        'dense_accuracy': acc,
        'epochs': epochs,
        'wall_seconds': time.time() - started,
        'pretrained': out_path,
    }
    if _is_writer():
        convert.save_variables_npz(variables, out_path)
        report.write_json(os.path.join(workdir, 'pretrain_results.json'), results)
    _log(f'dense test accuracy {100 * acc:.2f}% after {epochs} epochs; wrote {out_path}')
    return results


def initialize_distributed(config) -> None:
    """Join the processes of a multi-host run (every process runs the same command).

    --config.coordinator_address=HOST:PORT --config.num_processes=N --config.process_id=I name
    the run explicitly; --config.distributed=True alone lets JAX detect the cluster (SLURM,
    Open MPI, Cloud TPU). pmap's collectives then span every process's devices.
    """
    address = config_lib.get(config, 'coordinator_address')
    if address:
        if config_lib.get(config, 'num_processes') is None or config_lib.get(config, 'process_id') is None:
            raise ValueError(
                'coordinator_address: also set --config.num_processes=N and '
                '--config.process_id=I (0 on the coordinator)'
            )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    elif config_lib.get(config, 'distributed'):
        jax.distributed.initialize()


def run(config, workdir: str) -> dict:
    config_lib.validate(config)  # every value, before anything is loaded or written
    workdir_lib.check_usable(workdir, writes=config_lib.get(config, 'mode') != 'evaluate')
    initialize_distributed(config)
    if config_lib.get(config, 'mode') != 'evaluate':
        workdir_lib.check_free(workdir)
    modes = {'search': search, 'pretrain': pretrain, 'evaluate': evaluate}
    try:
        return modes[config.mode](config, workdir)
    finally:
        workdir_lib.release(workdir)  # the lock check_or_write_config took
