"""main.py as a user runs it: search on a Fashion-MNIST subset, kill/resume, evaluate, bad input."""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # main.py in subprocesses: full searches, kill and resume, bad input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = [
    '--config=configs/fashion_mnist.py',
    '--config.train_examples=4096',
    '--config.eval_examples=1000',
    '--config.epochs=2',
    '--config.progress=False',
]


# every main.py started here shares its compilations through JAX's persistent cache
JAX_CACHE = tempfile.mkdtemp(prefix='ljax-test-jax-cache-')
atexit.register(shutil.rmtree, JAX_CACHE, True)
CACHE_ENV = {
    'JAX_COMPILATION_CACHE_DIR': JAX_CACHE,
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
    'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
}


def main_cmd(workdir, *extra):
    return [sys.executable, 'main.py', *QUICK, f'--workdir={workdir}', *extra]


def run(workdir, *extra, env=None, timeout=300):
    return subprocess.run(
        main_cmd(workdir, *extra),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CACHE_ENV, **(env or {})},
    )


def load_mask(workdir):
    with np.load(os.path.join(workdir, 'jackpot.npz')) as z:
        return {k: z[k] for k in z.files if k.startswith('mask/')}


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('run'))
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc


def test_search_writes_results_and_jackpot(finished):
    workdir, proc = finished
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    for key in (
        'dense_accuracy',
        'magnitude_accuracy',
        'jackpot_accuracy',
        'sparsity',
        'epochs',
        'wall_seconds',
        'kept_per_layer',
    ):
        assert key in results
    assert results['sparsity'] == pytest.approx(0.9, abs=1e-6)
    assert results['jackpot_accuracy'] > results['magnitude_accuracy'] + 0.3
    # the fair one-shot baseline: BN statistics re-estimated for the pruned net
    assert results['magnitude_bn_accuracy'] > results['magnitude_accuracy'] + 0.2
    assert 0.1 < results['wanda_accuracy'] <= 1 and 0.1 < results['wanda_bn_accuracy'] <= 1
    assert results['jackpot_top5_accuracy'] >= results['jackpot_accuracy']
    for row in results['history']:
        assert {'loss', 'accuracy', 'flips', 'nonfinite_steps', 'jackpot_accuracy'} <= set(row)
        assert row['nonfinite_steps'] == 0
    for name in ('accuracy.png', 'kept_per_layer.png', 'flips.png'):
        with open(os.path.join(workdir, name), 'rb') as f:
            assert f.read(8) == b'\x89PNG\r\n\x1a\n'
        assert name in proc.stdout
    assert sum(r['kept'] for r in results['kept_per_layer'].values()) == round(
        0.1 * results['prunable_weights']
    )
    assert 'lottery jackpot' in proc.stdout and 'one-shot magnitude' in proc.stdout
    mask = load_mask(workdir)
    with np.load(os.path.join(workdir, 'jackpot.npz')) as z:
        for name, m in mask.items():
            w = z['params/' + name[len('mask/') :]]
            assert np.all(w[~m] == 0.0)
    assert os.listdir(os.path.join(workdir, 'tb'))


def test_evaluate_mode_reproduces_the_jackpot_accuracy(finished):
    workdir, _ = finished
    proc = run(workdir, '--config.mode=evaluate')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    acc, top5 = results['jackpot_accuracy'], results['jackpot_top5_accuracy']
    assert f'test accuracy {100 * acc:.2f}%, top-5 {100 * top5:.2f}%' in proc.stdout


def test_rerunning_a_finished_run_prints_its_results_and_scores_nothing(finished):
    workdir, _ = finished
    path = os.path.join(workdir, 'results.json')
    before, mtime = open(path).read(), os.path.getmtime(path)
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'is complete' in proc.stdout and 'lottery jackpot' in proc.stdout
    assert 'one-shot magnitude' in proc.stdout  # the table, read from results.json
    assert open(path).read() == before and os.path.getmtime(path) == mtime


def test_rerun_with_another_config_is_refused(finished):
    workdir, _ = finished
    before = open(os.path.join(workdir, 'results.json')).read()
    proc = run(workdir, '--config.sparsity=0.8')
    assert proc.returncode == 2
    assert 'different config' in proc.stderr and 'sparsity' in proc.stderr
    assert open(os.path.join(workdir, 'results.json')).read() == before


def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(finished, tmp_path):
    reference, _ = finished
    workdir = str(tmp_path / 'killed')
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    # SIGKILL twice: once right after the first checkpoint appears, once during the next saves
    for wait_for in (1, 2):
        proc = subprocess.Popen(
            main_cmd(workdir, '--config.checkpoint_every_steps=2'),
            cwd=REPO,
            env={**os.environ, **CACHE_ENV},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            steps = [d for d in os.listdir(ckpt_dir)] if os.path.isdir(ckpt_dir) else []
            if len([d for d in steps if d.isdigit()]) >= wait_for or (
                wait_for == 2 and any('tmp' in d for d in steps)
            ):
                break
            time.sleep(0.05)
        assert proc.poll() is None, 'the run finished before it could be killed'
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = run(workdir, '--config.checkpoint_every_steps=2')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'resumed from step' in proc.stdout
    ref, got = load_mask(reference), load_mask(workdir)
    assert ref.keys() == got.keys()
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k])


@pytest.mark.parametrize(
    'extra, env, message',
    [
        (['--config.sparsity=1.5'], {}, 'sparsity'),
        (['--config.sparsty=0.5'], {}, "unknown config field 'sparsty': did you mean 'sparsity'"),
        (['--config.pretrained=/no/such/file.npz'], {}, 'pretrained: no file'),
        (['--config.model_kwargs.hidden=(64, 64)'], {}, 'does not fit'),
        (['--config.batch_size=250'], {}, 'does not divide across the 4 local devices'),
        (
            [],
            {'LJAX_FASHION_MNIST_DIR': '/nonexistent', 'TFDS_DATA_DIR': '/nonexistent'},
            'apt-get install',
        ),
        (['--config=configs/nope.py'], {}, 'config: cannot load'),
    ],
)
def test_bad_input_is_one_line_and_touches_nothing(tmp_path, extra, env, message):
    workdir = tmp_path / 'w'
    proc = run(str(workdir), *extra, env=env, timeout=120)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not workdir.exists()


def test_unreadable_pretrained_file(tmp_path):
    bad = tmp_path / 'garbage.npz'
    bad.write_bytes(b'not a zip file at all')
    proc = run(str(tmp_path / 'w'), f'--config.pretrained={bad}', timeout=120)
    assert proc.returncode == 2 and 'pretrained' in proc.stderr and 'Traceback' not in proc.stderr
