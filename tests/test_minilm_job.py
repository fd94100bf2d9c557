"""main.py --config configs/minilm_wordnet.py, made tiny: the label-free 2:4 search of
all-MiniLM-L6-v2 on WordNet glosses, its results.json, the sentence-transformers export, and a
rerun with another config refused. Marked slow (the real 22M-parameter model on this CPU)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ljax.models.bert_export import torch_name

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    '--config=configs/minilm_wordnet.py',
    '--config.train_examples=96',
    '--config.eval_examples=40',
    '--config.probe_examples=200',
    '--config.calibration_examples=16',
    '--config.max_seq_length=16',  # one width: one compilation of each step
    '--config.batch_size=16',
    '--config.eval_batch_size=40',
    '--config.epochs=1',
    '--config.lr=20.0',
    '--config.baselines=False',
    '--config.progress=False',
]


def run(workdir, *extra):
    return subprocess.run(
        [sys.executable, 'main.py', *TINY, f'--workdir={workdir}', *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, 'HF_HUB_OFFLINE': '1'},
    )


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('minilm'))
    proc = run(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir, proc.stdout


def test_results_json_rows_and_history(finished):
    workdir, stdout = finished
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    names = [r['method'] for r in results['rows']]
    assert names == ['dense', 'jackpot']
    dense, jackpot = results['rows']
    assert dense['cosine'] == pytest.approx(1.0, abs=1e-5) and dense['nn10'] == 1.0
    assert 0.0 < jackpot['cosine'] < 1.0 and 0.0 <= jackpot['nn10'] < 1.0
    assert 0.0 <= jackpot['probe_accuracy'] <= 1.0 and jackpot['sparsity'] == pytest.approx(0.5)
    assert results['prunable_weights'] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # the 36 linears
    assert len(results['kept_per_layer']) == 36
    assert results['held_out_glosses'] == 40 and results['search_glosses'] == 96
    assert results['steps'] == 6 and len(results['history']) == 1  # 96 glosses of one width
    assert results['history'][0]['jackpot_cosine'] == jackpot['cosine']
    t = results['step_time']
    assert t['search_step_seconds'] > 0 and t['dense_step_seconds'] > 0
    assert 'lottery jackpot 2:4 (magnitude init)' in stdout and 'held-out cosine' in stdout
    for name in ('jackpot.npz', 'embedding_metrics.png', 'loss.png', 'config.json'):
        assert os.path.isfile(os.path.join(workdir, name)), name


def test_export_loads_in_sentence_transformers_with_2_of_4_weights(finished, monkeypatch):
    workdir, _ = finished
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    from sentence_transformers import SentenceTransformer

    export = os.path.join(workdir, 'sentence_transformer')
    tensors = load_file(os.path.join(export, 'model.safetensors'))
    with np.load(os.path.join(workdir, 'jackpot.npz')) as z:
        masks = {k[len('mask/'):]: z[k] for k in z.files if k.startswith('mask/')}
    assert len(masks) == 36
    for name, mask in masks.items():
        w = tensors[torch_name(name)]
        np.testing.assert_array_equal(w != 0, mask.T)  # the mask's kept weights, nonzero
        assert (np.count_nonzero(w.reshape(w.shape[0], -1, 4), axis=2) == 2).all(), name
    model = SentenceTransformer(export, device='cpu')
    from ljax.models import bert

    module, tokenizer = bert.load_minilm(export)
    texts = ['a domesticated carnivorous mammal', 'the act of running']
    np.testing.assert_allclose(
        model.encode(texts, convert_to_numpy=True), bert.encode(module, tokenizer, texts), atol=1e-5
    )


def test_a_rerun_with_another_config_is_refused(finished):
    workdir, _ = finished
    proc = run(workdir, '--config.lr=0.5')
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith('error: workdir')
    assert 'different config' in proc.stderr and 'lr=20.0 there vs 0.5 now' in proc.stderr


def test_hidden_state_distillation_runs_the_same_job(tmp_path):
    """--config.distill=hidden: the mask learns every layer's hidden states; the job still scores
    and exports the embedding."""
    workdir = str(tmp_path / 'hidden')
    proc = run(workdir, '--config.distill=hidden')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    dense, jackpot = results['rows']
    assert dense['cosine'] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < jackpot['cosine'] < 1.0 and jackpot['sparsity'] == pytest.approx(0.5)
    assert results['history'][0]['jackpot_cosine'] == jackpot['cosine']


def test_the_in_sample_ceiling_learns_from_the_held_out_glosses(tmp_path):
    """--config.search_glosses=held_out: the search learns from the scored glosses themselves,
    and its row and results.json say so."""
    workdir = str(tmp_path / 'ceiling')
    proc = run(workdir, '--config.search_glosses=held_out')
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, 'results.json')) as f:
        results = json.load(f)
    assert results['search_split'] == 'held_out'
    assert results['search_glosses'] == results['held_out_glosses'] == 40
    assert results['steps'] == 2  # 40 glosses: two full batches of 16 (one width), one epoch
    assert results['rows'][-1]['name'].endswith('in-sample)')
