"""The main job behind `main.py`: search (default), pretrain and evaluate, driven by a config.

A run lives in its workdir: config.json (a rerun with another config is refused), orbax
checkpoints/ (rerunning the same command resumes from the latest complete one), tb/ (TensorBoard),
and at the end jackpot.npz (masked params, batch_stats, mask, scores) and results.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any

import jax
import numpy as np
from ljax import cache, checkpoints, convert, data, report
from ljax import loop as loop_lib
from ljax import config as config_lib
from ljax import workdir as workdir_lib
from ljax import sparsity as sparsity_lib
from ljax.models import get_model
from ljax.parallel import AXIS_NAME, Parallel
from ljax.pretrain import DenseTraining
from ljax.search import Search, SearchOptions, older_states

JACKPOT_FILE = 'jackpot.npz'
RESULTS_FILE = 'results.json'
TORCH_SUFFIXES = ('.pth', '.pt', '.safetensors')


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_model(config):
    kwargs = dict(config.get('model_kwargs', None) or {})
    if config.get('sync_bn', False):
        kwargs['bn_axis_name'] = AXIS_NAME
    return get_model(config.model, config.num_classes, **kwargs)


def sample_input(config) -> np.ndarray:
    shape = data.dataset_info(config.dataset, image_size=config.get('image_size', None))[
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
    common = dict(data_dir=config.get('data_dir', None), image_size=config.get('image_size', None))
    train = data.get_dataset(
        config.dataset,
        'train',
        batch_size=batch_size,
        train=True,
        seed=config.seed,
        num_examples=config.get('train_examples', None),
        **common,
    )
    test = data.get_dataset(
        config.dataset,
        'test',
        batch_size=config.eval_batch_size,
        train=False,
        num_examples=config.get('eval_examples', None),
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
    from flax.metrics import tensorboard

    return tensorboard.SummaryWriter(os.path.join(workdir, 'tb'))


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
    _check_batch(config.batch_size, 'batch_size')
    _check_batch(config.eval_batch_size, 'eval_batch_size')
    model = build_model(config)
    variables = load_pretrained(config.pretrained, config.model)
    train, test = _datasets(config, config.batch_size)
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
        nm=parse_nm(config.get('nm', '')),
        calibration_batches=config.calibration_batches,
    )
    if not isinstance(config.epochs, int) or config.epochs < 1:
        raise ValueError(f'epochs: expected an integer >= 1, got {config.epochs!r}')
    try:
        search_ = Search.create(
            model,
            variables,
            sample_input(config),
            sparsity=config.sparsity,
            total_steps=total_steps,
            options=options,
            calibration=train.epoch(0),  # the one-shot Wanda baseline (and Wanda init)
        )
    except ValueError as e:
        if str(e).startswith('variables'):
            raise ValueError(
                f'pretrained: {config.pretrained} does not fit model {config.model!r}: '
                f'{str(e)[len("variables: ") :]}'
            ) from None
        raise
    # Everything is validated before the workdir is touched.
    identity = workdir_lib.run_identity(config, variables=variables, train=train, test=test)
    _write_config(workdir, config, identity)
    par = Parallel(search_)
    ckpt = checkpoints.Checkpoints(workdir, config.get('max_to_keep', 2))
    state = search_.init_state()
    layout = _layout(train)
    meta: dict[str, Any] = {'wall_seconds': 0.0, 'history': [], 'layout': layout}
    restored = ckpt.restore(state, older=older_states(state))
    if restored is not None:
        step, state, meta = restored
        _check_layout(meta.get('layout'), layout, config.sync_bn, workdir)
        meta['layout'] = layout
        _log(f'resumed from step {step} ({workdir})')
    else:
        _log(
            f'searching a {100 * config.sparsity:g}%-sparse jackpot of {config.model} on '
            f'{config.dataset}: {total_steps} steps on {jax.device_count()} device(s)'
            + (f' in {jax.process_count()} processes' if jax.process_count() > 1 else '')
        )
    if 'dense_accuracy' not in meta:
        _baselines(config, par, search_, train, test, meta)
    step = int(state.step)
    writer = _writer(workdir) if _is_writer() else None
    started = time.time() - meta['wall_seconds']

    def save(step, state_r):
        meta['wall_seconds'] = time.time() - started
        meta['epoch_sums'] = dataclasses.asdict(loop.sums)
        ckpt.save(step, par.unreplicate(state_r), meta)

    def on_log(step, metrics):
        if writer is None:
            return
        for k in ('loss', 'accuracy', 'flips', 'images_per_second'):
            writer.scalar(f'train/{k}', float(metrics[k]), step)
        writer.scalar('train/restriction_rate', search_.rate(step), step)

    def on_epoch(epoch, state_r, row):
        _record(row, 'jackpot', par.evaluate_state(test, state_r))
        row['seconds'] = time.time() - started  # since the start of the search, across resumes
        meta['history'].append(row)
        if writer is not None:
            writer.scalar('eval/jackpot_accuracy', row['jackpot_accuracy'], row['step'])
            writer.flush()
        save(row['step'], state_r)

    loop = loop_lib.Loop(
        par,
        epochs=config.epochs,
        steps_per_epoch=train.steps_per_epoch,
        batch_size=config.batch_size,
        log_every=config.get('log_every_steps', 50),
        on_log=on_log,
        on_epoch=on_epoch,
        periodic=[loop_lib.Periodic(config.get('checkpoint_every_steps', 500), save)],
        progress=config.get('progress', True) and _is_writer(),
        epoch_lines=_is_writer(),
        sums=loop_lib.EpochSums(**meta.get('epoch_sums', {})),
    )
    state_r, _ = loop.run(par.replicate(state), train.epoch, start_step=step)
    ckpt.wait()
    final = par.unreplicate(state_r)
    results = _finish(config, workdir, search_, final, meta, time.time() - started)
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


def _finish(config, workdir, search_: Search, final, meta, wall) -> dict:
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
        'nm': config.get('nm', '') or None,
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


# --------------------------------------------------------------------------------------- evaluate
def evaluate(config, workdir: str) -> dict:
    """Evaluate the exported jackpot (config.jackpot, default workdir/jackpot.npz) on the test split."""
    path = config.get('jackpot', None) or os.path.join(workdir, JACKPOT_FILE)
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
    _log(
        f'{path}: test accuracy {100 * out["accuracy"]:.2f}%, sparsity {100 * out["sparsity"]:.2f}%'
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
    ckpt = checkpoints.Checkpoints(workdir, config.get('max_to_keep', 2))
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
        log_every=config.get('log_every_steps', 50),
        on_epoch=lambda epoch, state_r, row: save(row['step'], state_r),
        progress=config.get('progress', True) and _is_writer(),
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
    address = config.get('coordinator_address', None)
    if address:
        if config.get('num_processes', None) is None or config.get('process_id', None) is None:
            raise ValueError(
                'coordinator_address: also set --config.num_processes=N and '
                '--config.process_id=I (0 on the coordinator)'
            )
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    elif config.get('distributed', False):
        jax.distributed.initialize()


def run(config, workdir: str) -> dict:
    config_lib.validate(config)  # every value, before anything is loaded or written
    workdir_lib.check_usable(workdir, writes=config.get('mode', 'search') != 'evaluate')
    initialize_distributed(config)
    modes = {'search': search, 'pretrain': pretrain, 'evaluate': evaluate}
    try:
        return modes[config.mode](config, workdir)
    finally:
        workdir_lib.release(workdir)  # the lock check_or_write_config took
