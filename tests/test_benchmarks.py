"""Smoke tests of the benchmark and study scripts at tiny sizes, so that they never rot.

They run the real code paths (data, pretraining, search rows, resume, analysis, CSV, plots) on a
synthetic stand-in for Fashion-MNIST; the measured numbers live in docs/RESULTS.md.
"""

import csv
import os
import sys
import time

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
)

import speed
import study

pytestmark = pytest.mark.slow  # runs the benchmark scripts


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_study_quick_runs_resumes_and_reports(tmp_path):
    argv = [
        '--quick',
        '--out',
        str(tmp_path),
        '--models',
        'mlp',
        '--schedules',
        'cosine',
        '--extra-schedules',
        '',
    ]
    # another model's rows, from an earlier run on other models: this run must leave them as they are
    other = 'model,sparsity,method,test_accuracy\nresnet32,0.9,magnitude_init,0.8756\n'
    (tmp_path / 'study_summary.csv').write_text(other)
    # --methods: only those rows, so that two processes can share a study
    part = study.main(argv + ['--methods', 'dense,magnitude_oneshot'])
    assert {r['method'] for r in part.values()} == {'dense', 'magnitude_oneshot'}
    with pytest.raises(SystemExit, match='--methods: unknown'):
        study.main(argv + ['--methods', 'magnitude'])
    rows = study.main(argv)
    assert rows['mlp_s90_dense']['wall_seconds'] == part['mlp_s90_dense']['wall_seconds']
    methods = {r['method'] for r in rows.values()}
    assert methods == {
        'dense',
        'magnitude_oneshot',
        'magnitude_bn',
        'random_init',
        'magnitude_init',
        'magnitude_third',
        'sr_cosine',
    }
    for r in rows.values():
        assert 0.0 <= r['final_accuracy'] <= 1.0
        # where the row ran: the virtual CPU devices here, so the convolution kernels are named
        assert r['device'].startswith('cpu ') and r['cpu_convolution'] in ('onednn', 'xla')
    jackpot = rows['mlp_s90_magnitude_init']
    assert jackpot['kept'] == round(0.1 * jackpot['prunable'])
    assert len(jackpot['curve']) == 1 + jackpot['epochs'] * jackpot['evals_per_epoch']
    assert len(jackpot['flips']) == jackpot['epochs'] * jackpot['steps_per_epoch']
    assert rows['mlp_s90_magnitude_third']['epochs'] == max(1, round(jackpot['epochs'] / 3))
    # a rerun finds every row done and only re-analyses
    t = time.time()
    again = study.main(argv)
    assert {k: r['final_accuracy'] for k, r in again.items()} == {
        k: r['final_accuracy'] for k, r in rows.items()
    }
    assert all(r['wall_seconds'] == rows[k]['wall_seconds'] for k, r in again.items())
    summary = _csv(tmp_path / 'study_summary.csv')
    assert {r['method'] for r in summary if r['model'] == 'mlp'} == methods
    assert len(summary) == len(methods) + 1  # this run's rows replaced, not appended again
    kept = [r for r in summary if r['model'] == 'resnet32']
    assert [(r['method'], r['test_accuracy']) for r in kept] == [('magnitude_init', '0.8756')]
    overlap = _csv(tmp_path / 'study_overlap.csv')
    assert {'magnitude', 'random', 'SNIP', 'SynFlow'} <= set(overlap[0])
    jackpot_overlap = next(r for r in overlap if r['searched_mask'] == 'magnitude_init')
    assert float(jackpot_overlap['magnitude']) > 0.5
    for name in ('study_accuracy_mlp.png', 'study_flips_loss_mlp.png'):
        assert 0 < os.path.getsize(tmp_path / name) < 200_000
    assert (tmp_path / 'tables.md').read_text().count('|') > 20
    assert time.time() - t < 60


def test_study_quick_beyond_and_seeds(tmp_path):
    """The 2:4 / ERK / Wanda rows and the seed rows: what each row claims to be, it is."""
    import numpy as np

    common = ['--quick', '--out', str(tmp_path), '--models', 'mlp']
    rows = study.main(common + ['--part', 'beyond'])
    nm = rows['mlp_s50_nm24_magnitude_init']
    assert nm['nm'] == [2, 4] and nm['kept'] * 2 == nm['prunable']
    # the saved 2:4 jackpot keeps exactly 2 of every 4 consecutive inputs of each kernel
    shapes = {'dense1/kernel': (784, 32), 'dense2/kernel': (32, 32)}
    assert set(nm['kept_per_layer']) == set(shapes)
    mask = study.load_mask(study.mask_path_for(str(tmp_path), 'mlp', 0.5, 'nm24_magnitude_init'), shapes)
    for m in mask.values():
        groups = m.reshape(m.shape[0] // 4, 4, m.shape[1]).sum(axis=1)
        assert (groups == 2).all()
    for key in ('nm24_magnitude_oneshot', 'nm24_wanda_bn'):
        assert rows[f'mlp_s50_{key}']['kept'] == nm['kept']
    erk, flat = rows['mlp_s90_erk_magnitude_init'], rows['mlp_s90_magnitude_init']
    assert erk['allocation'] == 'erk' and erk['kept'] == flat['kept']
    assert erk['kept_per_layer'] != flat['kept_per_layer']
    assert rows['mlp_s90_wanda_init']['score_init'] == 'wanda'
    assert rows['mlp_s90_wanda_oneshot']['kept'] == flat['kept']
    beyond = _csv(tmp_path / 'study_beyond.csv')
    assert {r['method'] for r in beyond} >= {'nm24_wanda_oneshot', 'erk_magnitude_init', 'wanda_init'}

    seeds = study.main(common + ['--part', 'seeds'])
    assert {r['seed'] for r in seeds.values()} == {0, 1, 2}
    # the seed-0 rows are the ones the beyond part already ran (cached), the others differ
    assert seeds['mlp_s90_magnitude_init']['wall_seconds'] == flat['wall_seconds']
    final = [seeds[f'mlp_s90_random_init{t}']['train_loss'] for t in ('', '_seed1', '_seed2')]
    assert not np.allclose(final[0], final[1]) and not np.allclose(final[1], final[2])
    table = _csv(tmp_path / 'study_seeds.csv')
    assert len(table) == 6 and {r['init'] for r in table} == {'magnitude', 'random'}
    # claim 2 per seed: the epoch at which magnitude init reaches random init's final accuracy
    for r in table:
        if r['init'] == 'random':
            assert r['epochs_to_random_final'] == ''
            continue
        rand = seeds['mlp_s90_random_init' + (f"_seed{r['seed']}" if r['seed'] != '0' else '')]
        e = study.epochs_to_target(seeds['mlp_s90_magnitude_init' + (f"_seed{r['seed']}" if r['seed'] != '0' else '')],
                                   rand['final_accuracy'])
        assert r['epochs_to_random_final'] == ('' if e is None else str(e))


    # labels vs none: the distilled row learns from the dense model, the labelled row is the one
    # the beyond part ran (cached)
    distill = study.main(common + ['--part', 'distill'])
    assert distill['mlp_s90_magnitude_init']['wall_seconds'] == flat['wall_seconds']
    kd = distill['mlp_s90_magnitude_init_distill']
    assert kd['teacher'] == 'dense' and kd['kept'] == flat['kept']
    assert not np.allclose(kd['train_loss'], flat['train_loss'])
    table = _csv(tmp_path / 'study_distill.csv')
    assert [(r['method'], r['labels']) for r in table] == [
        ('dense', ''), ('magnitude_init', 'True'), ('magnitude_init_distill', 'False')]
    assert float(table[2]['test_accuracy']) == kd['final_accuracy']


def test_speed_plain_times_at_least_min_seconds_of_compiled_steps():
    # A step of a few ms is timed over enough steps to fill min_seconds, counted from a compiled
    # step: timed with its compilation, the shipped MLP's step count stayed at 20.
    label, model, shape, batch, _, _ = speed.plain_models(True)[0]
    row = speed.plain_times(label, model, shape, batch, None, None, 2, warm=2, min_seconds=0.3)
    plain = min(row['plain_ms'], row['plain_not_donated_ms'])
    assert row['steps'] >= 100 and row['steps'] * plain / 1e3 >= 0.1, row


def test_speed_quick(tmp_path):
    speed.main(['--quick', '--results-dir', str(tmp_path), '--figures-dir', str(tmp_path)])
    steps = _csv(tmp_path / 'speed_step_time.csv')
    assert len(steps) == 1 and all(
        float(r['dense_ms']) > 0 and float(r['search_topk_ms']) > 0 for r in steps
    )
    loop = _csv(tmp_path / 'speed_loop.csv')
    assert len(loop) == 1 and all(
        float(loop[0][f'{k}_ms_per_step']) > 0 for k in ('dense', 'search', 'last_hint', 'floor')
    )
    api = _csv(tmp_path / 'speed_api.csv')
    assert len(api) == 1 and int(api[0]['steps']) == 16
    plain, ours = float(api[0]['plain_loop_s']), float(api[0]['search_jackpot_s'])
    assert plain > 0 and ours > 0 and abs(float(api[0]['ratio']) - ours / plain) < 1e-9
    plain = _csv(tmp_path / 'speed_plain.csv')
    assert len(plain) == 1 and int(plain[0]['warm']) == 2
    assert int(plain[0]['steps']) >= 2 and float(plain[0]['search_flips_per_step']) >= 0
    assert float(plain[0]['search_over_plain']) == float(plain[0]['search_ms']) / min(
        float(plain[0]['plain_ms']), float(plain[0]['plain_not_donated_ms']))
    parts = _csv(tmp_path / 'speed_breakdown.csv')
    assert len(parts) == 1 and int(parts[0]['prunable']) > 0
    floor = int(parts[0]['bytes_beyond_dense']) / (1e9 * float(parts[0]['bandwidth_GB_s']))
    assert abs(1e3 * floor - float(parts[0]['floor (ms)'])) < 1e-6
    timed = ('plain step', 'search step', 'mask update', 'score and mask update, one call')
    assert all(float(parts[0][f'{k} (ms)']) > 0 for k in timed)  # on CPU the last is the step's
    updates = _csv(tmp_path / 'speed_mask_update.csv')
    assert all(r['identical_to_lax_top_k'] == 'True' for r in updates)
    memory = _csv(tmp_path / 'speed_memory.csv')
    mlp = memory[0]
    # scores f32 + momentum f32 + mask bool + masked weights f32 per prunable weight, BN
    # statistics, a few scalars
    prunable = int(mlp['prunable'])
    assert int(mlp['scores_bytes']) == 4 * prunable and int(mlp['mask_bytes']) == prunable
    assert int(mlp['masked_weights_bytes']) == 4 * prunable
    assert (
        4 * prunable <= int(mlp['optimizer_bytes']) <= 4 * prunable + 64
    )  # momentum + a step count
    for name in ('speed_mask_update.png', 'speed_memory.png'):
        assert 0 < os.path.getsize(tmp_path / name) < 200_000


def test_fashion_mnist_loader_reads_the_directory_ljax_reads(tmp_path, monkeypatch):
    """benchlib.Data honours LJAX_FASHION_MNIST_DIR, as ljax.data does (a GPU machine or a user's
    copy of the files outside /usr/share)."""
    import benchlib
    import numpy as np
    from tests.test_data import _fake_fashion, _write_idx

    from ljax import data as ljax_data

    for split, n in (('train', 30), ('test', 20)):
        images, labels = _fake_fashion(n)
        for name, array in zip(ljax_data._FASHION_FILES[split], (images, labels)):
            _write_idx(tmp_path / name, array)
    monkeypatch.setenv(ljax_data.FASHION_MNIST_ENV, str(tmp_path))
    ours = benchlib.Data()
    assert ours.x_train.shape == (30, 28, 28, 1) and ours.x_test.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(ours.y_test, np.arange(20) % 10)


def test_fashion_mnist_loader_matches_ljax_data():
    """benchlib.Data normalises exactly as ljax.data.get_dataset (when the data is installed)."""
    import benchlib
    import numpy as np

    from ljax import data as ljax_data

    try:
        ours = benchlib.Data(train_examples=64, test_examples=100)
    except ljax_data.DatasetNotFoundError:
        pytest.skip('Fashion-MNIST is not installed')
    theirs = ljax_data.get_dataset(
        'fashion_mnist', 'test', batch_size=100, train=False, num_examples=100
    )
    x, y, _ = next(iter(theirs))
    np.testing.assert_allclose(ours.x_test, x, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(ours.y_test, y)


def test_accelerator_quick(tmp_path):
    import accelerator

    rows = accelerator.main(['--quick', '--out', str(tmp_path / 'acc.csv')])
    assert [r['dtype'] for r in rows] == ['float32', 'bfloat16']
    for r in rows:
        assert r['dense_ms'] > 0 and r['search_ms'] > 0 and r['devices'] == 4
    assert len(_csv(tmp_path / 'acc.csv')) == 2
    # --cases runs only the named rows; a name that is no row is refused with the list
    rows = accelerator.main(['--quick', '--cases', 'mlp:8:bfloat16', '--out', str(tmp_path / 'one.csv')])
    assert [r['dtype'] for r in rows] == ['bfloat16']
    assert [r['dtype'] for r in _csv(tmp_path / 'one.csv')] == ['bfloat16']
    with pytest.raises(SystemExit) as err:
        accelerator.main(['--quick', '--cases', 'mlp:8:float16', '--out', str(tmp_path / 'bad.csv')])
    assert err.value.code == 2 and not (tmp_path / 'bad.csv').exists()


def test_reductions_benchmark_agrees_at_a_ragged_size():
    import cpu_reductions as bench

    # over 2**18 elements: the rows trick and, where built, the native finite check both run
    rows = bench.main(['--size', '300007', '--calls', '1'])
    assert [r[0] for r in rows] == [
        'flip count: sum(a != b)', 'finite: all(isfinite(g))',
        'finite: tree_all_finite (native kernel where built)', 'max(where(a, index, -1))',
    ]
    assert all(r[-1] is True for r in rows)
