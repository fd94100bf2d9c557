"""Installing ljax: the core requirements resolve on every platform JAX ships for, and the library
needs neither TensorFlow nor TFDS (those are the `data` extra, for the CLI's pipelines only)."""

import json
import os
import subprocess
import sys
import textwrap
import tomllib

import pytest

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pip needs every tag a wheel may carry: with one exact manylinux tag it finds no jaxlib
PLATFORMS = {
    'linux_x86_64': (
        ['manylinux_2_28_x86_64', 'manylinux_2_27_x86_64', 'manylinux_2_17_x86_64'],
        ['manylinux2014_x86_64'],
        {'sys_platform': 'linux', 'platform_system': 'Linux', 'platform_machine': 'x86_64'},
    ),
    'linux_aarch64': (
        ['manylinux_2_28_aarch64', 'manylinux_2_27_aarch64', 'manylinux_2_17_aarch64'],
        ['manylinux2014_aarch64'],
        {'sys_platform': 'linux', 'platform_system': 'Linux', 'platform_machine': 'aarch64'},
    ),
    'macos_arm64': (
        ['macosx_11_0_arm64', 'macosx_12_0_arm64', 'macosx_13_0_arm64'],
        ['macosx_14_0_arm64'],
        {'sys_platform': 'darwin', 'platform_system': 'Darwin', 'platform_machine': 'arm64'},
    ),
}
# jax >= 0.11 needs Python 3.12. Old pip (23.2, the one Python 3.11's venv ships) checks
# Requires-Python against the interpreter that runs it even with --python-version: from 3.11 it
# resolves the newest releases that also support 3.11 (jax 0.10.2); under 3.12, the newest.
PYTHON = '3.12'


def _pyproject():
    with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)


def core_requirements() -> list[str]:
    """The package's own dependencies, as pyproject.toml declares them (a requirements file)."""
    files = _pyproject()['tool']['setuptools']['dynamic']['dependencies']['file']
    lines = []
    for name in files:
        with open(os.path.join(REPO, name)) as f:
            lines += [line.split('#', 1)[0].strip() for line in f]
    return [line for line in lines if line]


def extra_requirements(extra: str, environment: dict) -> list[str]:
    """The extra's requirements whose markers hold on `environment` (pip's dry run evaluates
    markers on this machine, not on the target platform), markers dropped."""
    env = default_environment() | {'python_version': PYTHON, 'python_full_version': PYTHON + '.0'}
    env |= environment
    out = []
    for text in _pyproject()['project']['optional-dependencies'][extra]:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(env):
            req.marker = None
            out.append(str(req))
    return out


def resolve(requirements: list[str], platform: str, tmp_path) -> dict[str, str]:
    """{name: version} that pip would install for Python 3.12 on `platform`, wheels only. pip
    evaluates environment markers (here and in the dependencies' metadata) on this machine."""
    tags_a, tags_b, _ = PLATFORMS[platform]
    report = tmp_path / 'report.json'
    cmd = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed', '--quiet']
    cmd += ['--only-binary=:all:', '--python-version', PYTHON, '--target', str(tmp_path / 't')]
    for tag in tags_a + tags_b:
        cmd += ['--platform', tag]
    cmd += ['--report', str(report), *requirements]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith('WARNING')]
    assert proc.returncode == 0, '\n'.join(errors[-20:])
    with open(report) as f:
        installs = json.load(f)['install']
    return {canonicalize_name(i['metadata']['name']): i['metadata']['version'] for i in installs}


def test_requirements_are_read():
    reqs = {canonicalize_name(Requirement(r).name) for r in core_requirements()}
    assert {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorboardx'} <= reqs
    assert not reqs & {'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets'}
    for platform in PLATFORMS.values():
        data = {Requirement(r).name for r in extra_requirements('data', platform[2])}
        assert 'tensorflow-datasets' in data and len(data & {'tensorflow', 'tensorflow-cpu'}) == 1


@pytest.mark.slow  # asks the package index
@pytest.mark.parametrize('platform', sorted(PLATFORMS))
def test_core_requirements_resolve(platform, tmp_path):
    versions = resolve(core_requirements(), platform, tmp_path)
    for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
        assert name in versions, sorted(versions)
    assert not {'tensorflow', 'tensorflow-cpu', 'torch'} & set(versions)


@pytest.mark.slow  # asks the package index
@pytest.mark.parametrize('platform', sorted(PLATFORMS))
def test_data_extra_tensorflow_resolves(platform, tmp_path):
    # TFDS itself is a wheel, but one of its dependencies (promise) is sdist-only, which a
    # cross-platform dry run cannot take: only TensorFlow, the platform-specific part, is resolved.
    reqs = extra_requirements('data', PLATFORMS[platform][2])
    tf = [r for r in reqs if Requirement(r).name in ('tensorflow', 'tensorflow-cpu')]
    versions = resolve(tf, platform, tmp_path)
    assert {'tensorflow', 'tensorflow-cpu'} & set(versions)


def run_python(code: str, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    env['XLA_FLAGS'] = ''  # one device: the tiny searches below need no data parallelism
    return subprocess.run(
        [sys.executable, '-c', textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow  # searches in fresh subprocesses
def test_library_needs_no_tensorflow():
    """`from ljax import search_jackpot` loads no TensorFlow, and a linen and an NNX search run
    with TensorFlow and TFDS made unimportable."""
    proc = run_python(
        """
        import sys
        import ljax
        from ljax import search_jackpot
        tf = ('tensorflow', 'tensorflow_datasets')
        assert not any(m.split('.')[0] in tf for m in sys.modules)
        sys.modules['tensorflow'] = sys.modules['tensorflow_datasets'] = None

        import flax.linen as nn
        import jax
        import numpy as np
        from flax import nnx

        class Linen(nn.Module):
            @nn.compact
            def __call__(self, x, train):
                x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x)))
                return nn.Dense(3)(x)

        class Nnx(nnx.Module):
            def __init__(self, rngs):
                self.hidden, self.head = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 3, rngs=rngs)

            def __call__(self, x):
                return self.head(nnx.relu(self.hidden(x)))

        rng = np.random.default_rng(0)
        x = rng.normal(size=(4, 16, 8)).astype(np.float32)
        batches = [(xb, xb[:, :3].argmax(1).astype(np.int32)) for xb in x]
        model = Linen()
        variables = model.init(jax.random.key(0), x[0], train=False)
        jp = search_jackpot(model, variables, batches, sparsity=0.5, epochs=1, progress=False)
        assert jp.kept_per_layer == {'Dense_0/kernel': 64}, jp.kept_per_layer
        jp = search_jackpot(Nnx(nnx.Rngs(0)), batches, sparsity=0.5, epochs=1, progress=False)
        assert sum(jp.kept_per_layer.values()) == 64, jp.kept_per_layer
        print('ok')
        """
    )
    assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


def test_tensorboard_scalars_are_written_without_tensorflow(tmp_path):
    proc = run_python(
        f"""
        import sys
        sys.modules['tensorflow'] = None
        from ljax.train import ScalarWriter
        w = ScalarWriter({str(tmp_path / 'tb')!r})
        for step in (1, 2):
            w.scalar('train/loss', 1.0 / step, step)
        w.scalar('eval/jackpot_accuracy', 0.75, 2)
        w.flush()
        w.close()
        assert 'torch' not in sys.modules  # tensorboardX imports it when it can (seconds)
        """,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # tensorboard is in the test extra: a missing reader fails here, it does not skip
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(str(tmp_path / 'tb'))
    events.Reload()
    assert set(events.Tags()['scalars']) == {'train/loss', 'eval/jackpot_accuracy'}
    assert [(e.step, e.value) for e in events.Scalars('train/loss')] == [(1, 1.0), (2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars('eval/jackpot_accuracy')] == [(2, 0.75)]


@pytest.mark.parametrize('missing', ['tensorflow', 'tensorflow_datasets'])
def test_missing_tensorflow_stops_the_cli_in_one_line(missing, tmp_path, monkeypatch, capsys):
    from ljax import cli, data

    monkeypatch.setitem(sys.modules, missing, None)  # `import tensorflow` raises
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / 'no-idx-files'))  # TFDS is asked
    with pytest.raises(data.MissingDataDependencyError, match=r"pip install 'ljax\[data\]'"):
        data.get_dataset('fashion_mnist', 'test', batch_size=8, train=False)

    config = cli.check_config_file(os.path.join(REPO, 'configs', 'fashion_mnist.py'))
    workdir = str(tmp_path / 'run')
    with pytest.raises(SystemExit) as info:
        cli.run_or_explain(config, workdir)
    assert info.value.code == cli.ERROR_EXIT
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('error: '), err
    assert "no module named 'tensorflow" in err  # or 'tensorflow' itself where it is not installed
    assert "pip install 'ljax[data]'" in err and "pip install -e '.[data]'" in err
