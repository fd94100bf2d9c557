"""The main job behind `main.py`: search (default), pretrain and evaluate, driven by a config.

A run lives in its workdir: config.json (a rerun with another config is refused), orbax
checkpoints/ (rerunning the same command resumes from the latest complete one), tb/ (TensorBoard),
and at the end jackpot.npz (masked params, batch_stats, mask, scores) and results.json.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils
from tqdm import tqdm

from ljax import checkpoints, convert, data, report
from ljax import config as config_lib
from ljax import workdir as workdir_lib
from ljax import sparsity as sparsity_lib
from ljax.models import get_model
from ljax.search import AXIS_NAME, Parallel, Search, SearchOptions

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
    return os.path.join(_cache_root(), f'{os.path.basename(path)}.{key}.npz')


def _cache_root() -> str:
    return os.environ.get('LJAX_CACHE', os.path.join(os.path.expanduser('~'), '.cache', 'ljax'))


def load_pretrained(path: str, arch: str) -> dict:
    """Variables from our .npz, or from a PyTorch file (.pth/.pt/.safetensors) converted once and cached."""
    if not path:
        raise ValueError(
            'pretrained: no checkpoint given; set --config.pretrained=PATH, or train one with '
            '--config.mode=pretrain'
        )
    if path in convert.PRETRAINED_URLS or path.startswith(('http://', 'https://')):
        try:
            path = str(convert.download_pretrained(path, os.path.join(_cache_root(), 'downloads')))
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


def _progress(total, initial, desc, config):
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit='step',
        dynamic_ncols=True,
        disable=not config.get('progress', True),
        mininterval=1.0,
    )


# --------------------------------------------------------------------------------------- search
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
        )
    except ValueError as e:
        if str(e).startswith('variables'):
            raise ValueError(
                f'pretrained: {config.pretrained} does not fit model {config.model!r}: '
                f'{str(e)[len("variables: ") :]}'
            ) from None
        raise
    config_lib.check_kept(search_.kept, config.sparsity)
    # Everything is validated before the workdir is touched.
    identity = workdir_lib.run_identity(config, variables=variables, train=train, test=test)
    checkpoints.check_or_write_config(workdir, config.to_dict(), identity)
    par = Parallel(search_)
    ckpt = checkpoints.Checkpoints(workdir, config.get('max_to_keep', 2))
    state = search_.init_state()
    meta: dict[str, Any] = {'wall_seconds': 0.0, 'history': []}
    restored = ckpt.restore(state)
    if restored is not None:
        step, state, meta = restored
        _log(f'resumed from step {step} ({workdir})')
    else:
        _log(
            f'searching a {100 * config.sparsity:g}%-sparse jackpot of {config.model} on '
            f'{config.dataset}: {total_steps} steps on {par.n} device(s)'
        )
    if 'dense_accuracy' not in meta:
        meta['dense_accuracy'] = par.evaluate(test, None, search_.batch_stats)['accuracy']
        meta['magnitude_accuracy'] = par.evaluate(test, search_.magnitude, search_.batch_stats)[
            'accuracy'
        ]
        _log(
            f'dense {100 * meta["dense_accuracy"]:.2f}%, one-shot magnitude '
            f'{100 * meta["magnitude_accuracy"]:.2f}% (no search)'
        )
    step = int(state.step)
    state_r = par.replicate(state)
    writer = _writer(workdir)
    started = time.time() - meta['wall_seconds']
    bar = _progress(total_steps, step, 'search', config)
    log_every = config.get('log_every_steps', 50)
    ckpt_every = config.get('checkpoint_every_steps', 500)

    def save(step):
        meta['wall_seconds'] = time.time() - started
        ckpt.save(step, par.unreplicate(state_r), meta)

    for epoch in range(step // train.steps_per_epoch, config.epochs):
        sums, n, t0 = {'loss': 0.0, 'accuracy': 0.0, 'flips': 0}, 0, time.time()
        for x, y in train.epoch(epoch, start_step=step % train.steps_per_epoch):
            state_r, metrics = par.train(state_r, x, y, search_.rate(step))
            step, n = step + 1, n + 1
            if step % log_every == 0 or step == total_steps:
                m = par.unreplicate(metrics)
                for k in sums:
                    sums[k] += m[k]
                ips = n * config.batch_size / (time.time() - t0)
                bar.set_postfix(
                    loss=f'{m["loss"]:.3f}', acc=f'{m["accuracy"]:.3f}', img_s=f'{ips:.0f}'
                )
                for k in sums:
                    writer.scalar(f'train/{k}', float(m[k]), step)
                writer.scalar('train/images_per_second', ips, step)
                writer.scalar('train/restriction_rate', search_.rate(step), step)
            bar.update(1)
            if step % ckpt_every == 0 and step % train.steps_per_epoch:
                save(step)
        acc = par.evaluate_state(test, state_r)['accuracy']
        meta['history'].append(
            {
                'epoch': epoch + 1,
                'step': step,
                'jackpot_accuracy': acc,
                'seconds': time.time() - started,
            }
        )
        writer.scalar('eval/jackpot_accuracy', acc, step)
        writer.flush()
        bar.write(f'epoch {epoch + 1}/{config.epochs}: jackpot test accuracy {100 * acc:.2f}%')
        save(step)
    bar.close()
    ckpt.wait()
    final = par.unreplicate(state_r)
    results = _finish(config, workdir, search_, final, meta, time.time() - started)
    ckpt.close()
    writer.close()
    return results


def _finish(config, workdir, search_: Search, final, meta, wall) -> dict:
    mask = {n: np.asarray(final.mask[n]) for n in search_.names}
    jackpot = search_.jackpot_variables(mask, final.batch_stats)
    if jax.process_index() == 0:  # every process holds the same state; one writes it
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
        'dense_accuracy': meta['dense_accuracy'],
        'magnitude_accuracy': meta['magnitude_accuracy'],
        'jackpot_accuracy': meta['history'][-1]['jackpot_accuracy'] if meta['history'] else None,
        'sparsity': report.achieved_sparsity(mask),
        'target_sparsity': config.sparsity,
        'prunable_weights': sum(int(m.size) for m in mask.values()),
        'epochs': config.epochs,
        'steps': int(final.step),
        'wall_seconds': wall,
        'overlap_with_magnitude': report.overlap(mask, magnitude),
        'kept_per_layer': report.kept_per_layer(mask),
        'history': meta['history'],
        'devices': jax.local_device_count(),
        'platform': jax.devices()[0].platform,
    }
    if jax.process_index() == 0:
        report.write_json(os.path.join(workdir, RESULTS_FILE), results)
    _log('\n' + report.results_table(results))
    _log(f'\nwrote {os.path.join(workdir, JACKPOT_FILE)} and {os.path.join(workdir, RESULTS_FILE)}')
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
    checkpoints.check_or_write_config(workdir, config.to_dict(), identity)
    epochs = config.pretrain_epochs
    total = epochs * train.steps_per_epoch
    tx = optax.chain(
        optax.add_decayed_weights(config.pretrain_weight_decay),
        optax.sgd(
            optax.cosine_decay_schedule(config.pretrain_lr, total), momentum=0.9, nesterov=True
        ),
    )
    variables = model.init(jax.random.key(config.seed), sample_input(config), train=False)
    state = {
        'step': jnp.zeros((), jnp.int32),
        'params': variables['params'],
        'batch_stats': variables.get('batch_stats', {}),
        'opt_state': tx.init(variables['params']),
    }
    ckpt = checkpoints.Checkpoints(workdir, config.get('max_to_keep', 2))
    meta = {'wall_seconds': 0.0}
    restored = ckpt.restore(state)
    if restored is not None:
        step, state, meta = restored
        _log(f'resumed from step {step} ({workdir})')

    def train_step(state, x, y):
        def loss_fn(p):
            v = {'params': p, 'batch_stats': state['batch_stats']}
            logits, upd = model.apply(v, x, train=True, mutable=['batch_stats'])
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd.get(
                'batch_stats', {}
            )

        (loss, bs), g = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
        updates, opt = tx.update(jax.lax.pmean(g, AXIS_NAME), state['opt_state'], state['params'])
        return {
            'step': state['step'] + 1,
            'params': optax.apply_updates(state['params'], updates),
            'batch_stats': jax.lax.pmean(bs, AXIS_NAME),
            'opt_state': opt,
        }, jax.lax.pmean(loss, AXIS_NAME)

    devices = jax.local_devices()
    p_step = jax.pmap(train_step, AXIS_NAME, donate_argnums=(0,))
    state_r = jax_utils.replicate(state, devices)
    step = int(state['step'])
    started = time.time() - meta['wall_seconds']
    bar = _progress(total, step, 'pretrain', config)
    n = len(devices)
    for epoch in range(step // train.steps_per_epoch, epochs):
        for x, y in train.epoch(epoch, start_step=step % train.steps_per_epoch):
            x = x.reshape((n, -1) + x.shape[1:])
            state_r, loss = p_step(state_r, x, y.reshape(n, -1))
            step += 1
            bar.update(1)
            if step % config.get('log_every_steps', 50) == 0:
                bar.set_postfix(loss=f'{float(loss[0]):.3f}')
        meta['wall_seconds'] = time.time() - started
        ckpt.save(step, Parallel.unreplicate(state_r), meta)
    bar.close()
    ckpt.close()
    final = Parallel.unreplicate(state_r)
    variables = {'params': final['params']}
    if final['batch_stats']:
        variables['batch_stats'] = final['batch_stats']
    search_ = Search.create(model, variables, sample_input(config), sparsity=0.0, total_steps=1)
    acc = Parallel(search_).evaluate(test, None, variables.get('batch_stats'))['accuracy']
    out_path = os.path.join(workdir, 'pretrained.npz')
    convert.save_variables_npz(variables, out_path)
    results = {
        'dense_accuracy': acc,
        'epochs': epochs,
        'wall_seconds': time.time() - started,
        'pretrained': out_path,
    }
    report.write_json(os.path.join(workdir, 'pretrain_results.json'), results)
    _log(f'dense test accuracy {100 * acc:.2f}% after {epochs} epochs; wrote {out_path}')
    return results


def run(config, workdir: str) -> dict:
    config_lib.validate(config)  # every value, before anything is loaded or written
    workdir_lib.check_usable(workdir, writes=config.get('mode', 'search') != 'evaluate')
    try:
        return _run(config, workdir)
    finally:
        workdir_lib.release(workdir)  # the lock check_or_write_config took


def _run(config, workdir: str) -> dict:
    if config.get('distributed', False):
        # Multi-host (TPU pods, several GPU machines): every process runs this same command; pmap's
        # collectives then span all hosts, and each process reads its own shard of the data.
        jax.distributed.initialize()
    modes = {'search': search, 'pretrain': pretrain, 'evaluate': evaluate}
    if config.mode not in modes:
        raise ValueError(f'mode: expected one of {sorted(modes)}, got {config.mode!r}')
    if config.mode == 'search' and (
        isinstance(config.sparsity, bool) or not 0 <= config.sparsity < 1
    ):
        raise ValueError(
            f'sparsity: expected the fraction of prunable weights to remove, in [0, 1) '
            f'(0.9 keeps 10%), got {config.sparsity!r}'
        )
    return modes[config.mode](config, workdir)
