"""The notebooks in notebooks/ run top to bottom here, on CPU, with small parameters.

Papermill injects the parameters (a cell after the one tagged `parameters`) and executes each notebook
in a copy under tmp_path with a kernel of this very Python: the kernelspec is written here and found
first through JUPYTER_PATH, whatever kernels the machine has. The kernel gets the 4 virtual CPU devices
of tests/conftest.py, so both searches run data-parallel under pmap. Committed notebooks carry no
outputs (checked here too).

- quickstart.ipynb: the shipped Fashion-MNIST model on 4,096 training / 2,000 test images (the Debian
  IDX files), 2 epochs.
- imagenet_tpu.ipynb: a random ResNet-50 saved as a torchvision .pth, TFDS mock ImageNet at 32x32,
  batch 8, 2 steps with a checkpoint after each; then run again after deleting the newest checkpoint,
  as a runtime that disconnected would leave it: it must say "resumed from step 1" and finish.
"""
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / 'notebooks'
NAMES = ('quickstart.ipynb', 'imagenet_tpu.ipynb')
KERNEL = 'ljax-notebook-tests'
FASHION_MNIST = Path('/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz')

QUICKSTART = {'EPOCHS': 2, 'TRAIN_EXAMPLES': 4096, 'EVAL_EXAMPLES': 2000}


def imagenet_parameters(tmp_path, weights):
    return {
        'TORCHVISION_WEIGHTS': str(weights),
        'WEIGHTS_DIR': str(tmp_path / 'weights'),
        'LJAX_CACHE_DIR': str(tmp_path / 'ljax_cache'),
        'DATA_DIR': str(tmp_path / 'tensorflow_datasets'),
        'CHECKPOINT_DIR': str(tmp_path / 'run'),
        'IMAGE_SIZE': 32,
        'BATCH_SIZE': 8,
        'EVAL_BATCH_SIZE': 8,
        'EPOCHS': 1,
        'TRAIN_EXAMPLES': 16,  # 2 steps of 8
        'EVAL_EXAMPLES': 8,
        'CHECKPOINT_EVERY_STEPS': 1,  # a checkpoint after step 1 (mid-epoch) and step 2 (epoch end)
        'PROGRESS': False,
        'USE_MOCK_DATA': True,
        'MOCK_EXAMPLES': 16,
    }


# ------------------------------------------------------------------------------ committed notebooks


@pytest.mark.parametrize('name', NAMES)
def test_committed_notebook_is_valid_and_stripped(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == 'python3'
    assert not {'papermill', 'widgets'} & set(nb.metadata)
    for cell in nb.cells:
        assert 'papermill' not in cell.metadata and 'execution' not in cell.metadata, cell.id
        if cell.cell_type == 'code':
            assert cell.outputs == [], f'{name}: cell {cell.id} has outputs; clear them before committing'
            assert cell.execution_count is None, f'{name}: cell {cell.id} has an execution count'


@pytest.mark.parametrize('name', NAMES)
def test_parameters_cell_comes_first_and_declares_what_ci_injects(name, tmp_path):
    import papermill

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == 'code']
    assert 'parameters' in code[0].metadata.get('tags', []), 'the first code cell must be tagged parameters'
    # papermill only sees `NAME = value  # help` lines; a second '=' on a line hides the parameter.
    declared = set(papermill.inspect_notebook(str(NOTEBOOKS / name)))
    injected = QUICKSTART if name == 'quickstart.ipynb' else imagenet_parameters(tmp_path, 'x.pth')
    assert set(injected) <= declared, f'not in the parameters cell: {set(injected) - declared}'
    assert 'LJAX_REPO' in declared


def test_notebooks_readme_says_how_to_open_them_in_colab():
    text = (NOTEBOOKS / 'README.md').read_text()
    for name in NAMES:
        assert f'https://colab.research.google.com/github/<org>/ljax/blob/main/notebooks/{name}' in text


# ------------------------------------------------------------------------------ execution


@pytest.fixture(scope='module')
def kernel(tmp_path_factory):
    """A kernelspec for this interpreter, first on JUPYTER_PATH; the kernel's environment for CI."""
    root = tmp_path_factory.mktemp('jupyter')
    spec = root / 'kernels' / KERNEL
    spec.mkdir(parents=True)
    env = {
        'XLA_FLAGS': os.environ.get('XLA_FLAGS', ''),  # conftest: 4 virtual CPU devices
        'JAX_PLATFORMS': 'cpu',
        'JAX_COMPILATION_CACHE_DIR': str(root / 'jax_cache'),  # the second ImageNet run reuses it
        'TF_CPP_MIN_LOG_LEVEL': '2',
        'MPLBACKEND': 'module://matplotlib_inline.backend_inline',  # figures as outputs, whatever CI sets
    }
    (spec / 'kernel.json').write_text(json.dumps({
        'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'ljax tests', 'language': 'python', 'env': env,
    }))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('JUPYTER_PATH', str(root) + os.pathsep + os.environ.get('JUPYTER_PATH', ''))
        yield KERNEL


def execute(name, workdir, parameters):
    """Runs notebooks/<name> with papermill in workdir; returns the executed notebook and seconds."""
    import papermill

    workdir.mkdir(parents=True, exist_ok=True)
    output = workdir / name.replace('.ipynb', f'.{len(list(workdir.glob("*.out.ipynb")))}.out.ipynb')
    started = time.monotonic()
    papermill.execute_notebook(str(NOTEBOOKS / name), str(output), parameters=parameters,
                               kernel_name=KERNEL, cwd=str(workdir), progress_bar=False,
                               log_output=False, start_timeout=120, execution_timeout=600)
    seconds = time.monotonic() - started
    print(f'{name}: {seconds:.0f} s')
    return nbformat.read(output, as_version=4), seconds


def stdout(nb, tag=None):
    cells = [c for c in nb.cells if c.cell_type == 'code' and (tag is None or tag in c.metadata.get('tags', []))]
    assert cells, f'no cell tagged {tag}'
    return ''.join(o.get('text', '') for c in cells for o in c.outputs
                   if o.output_type == 'stream' and o.name == 'stdout')


def json_output(nb, tag):
    """The JSON object printed (indented) by the cell tagged `tag`."""
    lines = stdout(nb, tag).splitlines()
    return json.loads('\n'.join(lines[lines.index('{'):]))


def figures(nb):
    return sum('image/png' in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.exists(), reason='dataset-fashion-mnist not installed')
def test_quickstart_notebook(tmp_path, kernel):
    nb, _ = execute('quickstart.ipynb', tmp_path, QUICKSTART)
    text = stdout(nb)
    executable = re.search(r'^Python \S+ at (.+)$', text, re.M).group(1)
    assert os.path.realpath(executable) == os.path.realpath(sys.executable)
    assert 'ljax is already installed' in text
    results = json_output(nb, 'results')
    assert results['devices'] == 4
    assert (results['train_examples'], results['test_examples'], results['epochs']) == (4096, 2000, 2)
    assert results['sparsity'] == pytest.approx(0.9, abs=1e-5)
    assert results['prunable_weights'] == 784 * 768 + 768 * 768
    assert results['dense_accuracy'] > 0.85
    assert results['magnitude_accuracy'] < 0.5
    assert results['jackpot_accuracy'] > results['magnitude_accuracy'] + 0.3
    assert [row['epoch'] for row in results['history']] == [1, 2]
    assert results['history'][-1]['eval_accuracy'] == pytest.approx(results['jackpot_accuracy'])
    assert 0.5 < results['overlap_with_magnitude'] <= 1.0
    assert results['kept_per_layer']['classifier/kernel'] == {'kept': 768 * 10, 'total': 768 * 10}
    assert figures(nb) == 3  # accuracy per epoch, kept per layer + overlap, swapped magnitudes
    assert (tmp_path / 'quickstart_output' / 'fashion_mnist_jackpot.npz').is_file()


@pytest.fixture(scope='module')
def random_resnet50_pth(tmp_path_factory):
    """A random ResNet-50 written as torchvision writes resnet50-0676ba61.pth."""
    torch = pytest.importorskip('torch')
    import jax

    from ljax import convert
    from ljax.models import get_model

    variables = get_model('resnet50', 1000).init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                                 train=False)
    state = convert.to_torch(jax.device_get(variables), 'resnet50')
    path = tmp_path_factory.mktemp('torchvision') / 'resnet50-random.pth'
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return path


@pytest.mark.slow
def test_imagenet_tpu_notebook_runs_and_resumes(tmp_path, kernel, random_resnet50_pth):
    parameters = imagenet_parameters(tmp_path, random_resnet50_pth)
    run = tmp_path / 'run'
    nb, _ = execute('imagenet_tpu.ipynb', tmp_path, parameters)
    text = stdout(nb)
    assert 'searching a 90%-sparse jackpot of resnet50 on imagenet2012: 2 steps on 4 device(s)' in text
    assert 'converted ' in text and 'resumed' not in text
    summary = json_output(nb, 'results')
    assert (summary['steps'], summary['epochs'], summary['devices']) == (2, 1, 4)
    assert summary['sparsity'] == pytest.approx(0.9, abs=1e-5)
    assert summary['jackpot'] == str(run / 'jackpot.npz')
    assert figures(nb) == 2
    assert (run / 'resnet50_jackpot.pth').is_file()
    steps = sorted(int(p.name) for p in (run / 'checkpoints').iterdir() if p.name.isdigit())
    assert steps == [1, 2]

    # The runtime disconnected right after the mid-epoch checkpoint: only step 1 is on disk.
    shutil.rmtree(run / 'checkpoints' / '2')
    for name in ('results.json', 'jackpot.npz', 'resnet50_jackpot.pth'):
        (run / name).unlink()
    nb, _ = execute('imagenet_tpu.ipynb', tmp_path, parameters)
    text = stdout(nb)
    assert f'resumed from step 1 ({run})' in text
    assert 'searching a' not in text and 'converted ' not in text  # converted weights came from the cache
    assert 'epoch 1/1: jackpot test accuracy' in text
    summary = json_output(nb, 'results')
    assert (summary['steps'], summary['devices']) == (2, 4)
    assert json.loads((run / 'results.json').read_text())['steps'] == 2
    assert (run / 'resnet50_jackpot.pth').is_file()
