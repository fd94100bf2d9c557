"""ljax.models.onednn: oneDNN's convolution through XLA's FFI equals lax.conv_general_dilated
(values, input and weight gradients), covers only what it should, builds from a clean cache (once,
however many processes ask at the same time) and loads only a library no other user can have
written."""

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ljax.models import layers, onednn

DN = ('NHWC', 'HWIO', 'NHWC')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(
    not (sys.platform == 'linux' and os.uname().machine == 'x86_64'),
    reason='the onednn wheels of ljax[cpu] exist for Linux x86-64 only',
)
def test_available_here():
    # CI and the README install 'ljax[cpu]': a broken build must fail here, not silently fall
    # back to XLA's slower kernels.
    assert onednn.available(), onednn.reason()


def _inputs(x_shape, w_shape, seed=0):
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32) / np.sqrt(np.prod(w_shape[:-1]))
    return x, w, kg


def _value_and_grads(conv, x, w, kg):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(jax.random.normal(kg, y.shape, jnp.float32)))


def _close(a, b):
    # float32 sums of many terms: absolute errors scale with the largest value
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


def _pairs(padding, x_shape, w_shape, strides, dilation):
    window = [(k - 1) * d + 1 for k, d in zip(w_shape[:2], dilation)]
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(x_shape[1:3], window, strides, padding))
    return padding


CASES = [
    # (x shape, w shape, strides, padding, dilation)
    ((2, 8, 8, 3), (3, 3, 3, 5), (1, 1), 'SAME', (1, 1)),
    ((3, 9, 7, 4), (3, 3, 4, 6), (2, 2), 'SAME', (1, 1)),
    ((2, 8, 8, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1)), (1, 1)),  # 7/2: a row left over
    ((2, 9, 9, 4), (3, 3, 4, 6), (2, 1), 'VALID', (1, 1)),
    ((2, 10, 11, 3), (5, 3, 3, 4), (1, 2), ((2, 0), (0, 3)), (1, 1)),  # asymmetric
    ((2, 12, 12, 3), (3, 3, 3, 4), (1, 1), 'SAME', (2, 2)),  # dilated kernel
    ((1, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),  # a ResNet-50 stem
    ((2, 6, 6, 16), (1, 1, 16, 8), (2, 2), 'VALID', (1, 1)),  # 1x1, strided
    ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), 'SAME', (1, 1)),  # tiny map
]


@pytest.mark.slow  # 9 convolutions in 2 dtypes against XLA's, each compiled twice
@pytest.mark.parametrize('x_shape, w_shape, strides, padding, dilation', CASES)
def test_equals_lax(x_shape, w_shape, strides, padding, dilation):
    x, w, kg = _inputs(x_shape, w_shape)
    pads = _pairs(padding, x_shape, w_shape, strides, dilation)

    def ref(x, w):
        return lax.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN
        )

    def fast(x, w):
        return onednn.conv(x, w, strides, pads, dilation)

    got = jax.jit(lambda x, w: _value_and_grads(fast, x, w, kg))(x, w)
    want = jax.jit(lambda x, w: _value_and_grads(ref, x, w, kg))(x, w)
    for a, b, what in zip(got, want, ('output', 'd/dx', 'd/dw')):
        assert a.shape == b.shape and a.dtype == b.dtype, what
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=what)
    # and through layers.conv_general_dilated, as nn.Conv calls it
    forced = jax.jit(
        lambda x, w: layers.conv_general_dilated(
            x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN, method='onednn'
        )
    )
    assert 'ljax_onednn_conv_forward' in str(jax.jit(forced).lower(x, w).as_text())
    np.testing.assert_allclose(np.asarray(forced(x, w)), np.asarray(want[0]), rtol=1e-5, atol=1e-5)


def test_vmap_grad_and_pmap():
    x, w, kg = _inputs((3, 2, 8, 8, 4), (3, 3, 4, 5))
    pads = ((1, 1), (1, 1))

    def loss(conv, x, w):
        return jnp.sum(jnp.sin(conv(x, w)))

    fast = lambda x, w: onednn.conv(x, w, (1, 1), pads)
    ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=DN)
    # vmap over a leading axis (the FFI call runs once per element), with its gradient
    g_fast = jax.jit(jax.vmap(jax.grad(lambda x, w: loss(fast, x, w), 1), (0, None)))(x, w)
    g_ref = jax.jit(jax.vmap(jax.grad(lambda x, w: loss(ref, x, w), 1), (0, None)))(x, w)
    _close(g_fast, g_ref)
    # pmap over the virtual CPU devices (conftest makes 4), each device its own call, at the
    # same time: with oneDNN's shared scratchpad this corrupted the results (errors of 50 here)
    n = jax.local_device_count()
    xs = jnp.broadcast_to(x[0], (n, *x.shape[1:])) * jnp.arange(1, n + 1)[:, None, None, None, None]
    got = jax.pmap(jax.grad(lambda x, w: loss(fast, x, w), 1), in_axes=(0, None))(xs, w)
    want = jax.pmap(jax.grad(lambda x, w: loss(ref, x, w), 1), in_axes=(0, None))(xs, w)
    _close(got, want)


@pytest.mark.parametrize(
    'x_dtype, kwargs',
    [
        (jnp.bfloat16, {}),
        (jnp.float32, dict(feature_group_count=2)),
        (jnp.float32, dict(lhs_dilation=(2, 2))),
        (jnp.float32, dict(padding=((-1, 0), (0, 0)))),
        (jnp.float32, dict(dimension_numbers=('NCHW', 'OIHW', 'NCHW'))),
    ],
)
def test_what_it_does_not_cover_runs_lax(x_dtype, kwargs):
    kwargs = {'padding': ((1, 1), (1, 1)), 'dimension_numbers': DN, **kwargs}
    groups = kwargs.get('feature_group_count', 1)
    if kwargs['dimension_numbers'] == DN:
        x, w, _ = _inputs((2, 6, 6, 4), (3, 3, 4 // groups, 6))
    else:
        x, w, _ = _inputs((2, 4, 6, 6), (6, 4, 3, 3))
    x, w = x.astype(x_dtype), w.astype(x_dtype)
    for method in ('auto', 'onednn'):
        fn = jax.jit(
            lambda x, w: layers.conv_general_dilated(x, w, (1, 1), method=method, **kwargs)
        )
        assert 'ljax_onednn' not in fn.lower(x, w).as_text(), (method, kwargs)
        want = lax.conv_general_dilated(x, w, (1, 1), **kwargs)
        np.testing.assert_array_equal(np.asarray(fn(x, w)), np.asarray(want))


def _python(code, *args, **env):
    """Runs `python -c code` (or `python -m ...` when code is '-m') with these environment
    variables."""
    argv = ['-m', *args] if code == '-m' else ['-c', textwrap.dedent(code)]
    return subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', **{k: str(v) for k, v in env.items()}},
        timeout=600,
    )


BUILD = ('-m', 'ljax.models.onednn', '--build')  # the build command (README, CI)


@pytest.fixture(scope='session')
def built(tmp_path_factory):
    """The one real build of these tests: the build command, into an empty cache. (cache root,
    the command's result)."""
    root = tmp_path_factory.mktemp('cache')
    return root, _python(*BUILD, LJAX_CACHE=root)


def test_build_command_builds_into_a_private_directory(built):
    root, done = built
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    path = Path(lines[0])
    assert path.parent == root / 'onednn' and path.suffix == '.so'
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert sorted(p.name for p in path.parent.iterdir()) == ['.lock', path.name]  # no temporary
    assert 'Warning' not in done.stderr, done.stderr  # runpy's about ljax.models importing it
    # again: found, not built
    built_at = path.stat().st_mtime_ns
    again = _python(*BUILD, LJAX_CACHE=root)
    assert again.returncode == 0 and again.stdout == done.stdout, again.stderr[-2000:]
    assert path.stat().st_mtime_ns == built_at


def test_build_command_without_a_compiler(tmp_path):
    done = _python(*BUILD, LJAX_CACHE=tmp_path, CXX='/nonexistent/g++')
    assert done.returncode == 1
    assert done.stdout.splitlines() == [
        "ljax: no oneDNN kernels, convolutions will run on XLA:CPU's own kernels: "
        'no C++ compiler (g++, or $CXX) to build the oneDNN kernels'
    ]


def test_loads_from_the_cache_and_falls_back_with_a_reason(built, tmp_path):
    probe = """
        import jax, jax.numpy as jnp, numpy as np
        from jax import lax
        from ljax.models import onednn, layers
        print('available', onednn.available(), onednn.reason())
        x = jnp.ones((1, 5, 5, 2)); w = jnp.ones((3, 3, 2, 3))
        y = jax.jit(lambda x, w: layers.conv_general_dilated(
            x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))(x, w)
        want = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        print('equal', bool(np.allclose(y, want)))
    """
    root, _ = built
    files = {p: p.stat().st_mtime_ns for p in (root / 'onednn').iterdir()}
    found = _python(probe, LJAX_CACHE=root)
    assert found.returncode == 0, found.stderr[-2000:]
    assert 'available True' in found.stdout and 'equal True' in found.stdout
    assert {p: p.stat().st_mtime_ns for p in (root / 'onednn').iterdir()} == files  # not rebuilt
    off = _python(probe, LJAX_CACHE=tmp_path / 'off', LJAX_ONEDNN='0')
    assert 'available False turned off by LJAX_ONEDNN=0' in off.stdout, off.stderr[-2000:]
    assert 'equal True' in off.stdout
    assert not (tmp_path / 'off').exists()
    assert "XLA:CPU's own kernels" not in off.stderr  # the user's choice: no warning
    no_cxx = _python(probe, LJAX_CACHE=tmp_path / 'nocxx', CXX='/nonexistent/g++')
    assert 'available False no C++ compiler' in no_cxx.stdout, no_cxx.stderr[-2000:]
    assert 'equal True' in no_cxx.stdout
    assert no_cxx.stderr.count("ljax: convolutions run on XLA:CPU's own kernels") == 1


FAKE_CXX = """#!{python}
# A stand-in for the C++ compiler: logs each build's output path to $FAKE_CXX_LOG, waits
# $FAKE_CXX_SLEEP seconds, and copies the library built for real once by these tests.
import os, shutil, sys, time
if sys.argv[1:] == ['--version']:
    print(os.environ.get('FAKE_CXX_VERSION', 'fake-c++ 1.0'))
    sys.exit(0)
out = sys.argv[sys.argv.index('-o') + 1]
with open(os.environ['FAKE_CXX_LOG'], 'a') as log:
    log.write(out + '\\n')
time.sleep(float(os.environ.get('FAKE_CXX_SLEEP', '0')))
shutil.copyfile({library!r}, out)
"""


@pytest.fixture
def fake_cxx(built, tmp_path, monkeypatch):
    """A compiler (as $CXX) whose builds copy the real one's, cheap; and its log of builds."""
    root, done = built
    assert done.returncode == 0, done.stderr[-2000:]
    cxx = tmp_path / 'fake-c++'
    cxx.write_text(FAKE_CXX.format(python=sys.executable, library=done.stdout.strip()))
    cxx.chmod(0o755)
    log = tmp_path / 'builds.log'
    env = dict(LJAX_CACHE=str(tmp_path / 'cache'), CXX=str(cxx), FAKE_CXX_LOG=str(log))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return lambda: log.read_text().splitlines() if log.exists() else []


def test_the_key_follows_the_compiler_and_onednn_versions(monkeypatch):
    toolchain = onednn._toolchain()
    cxx, include, _ = toolchain
    first_line = subprocess.run([cxx, '--version'], capture_output=True, text=True).stdout
    assert onednn._compiler_version(cxx) == first_line.splitlines()[0]
    assert 'MAJOR=' in onednn._onednn_version(include)
    key = onednn._key(*toolchain)
    assert onednn._key(*toolchain) == key
    monkeypatch.setattr(onednn, '_compiler_version', lambda cxx: 'g++ (Debian 12.3.0-1) 12.3.0')
    other_compiler = onednn._key(*toolchain)
    assert other_compiler != key
    monkeypatch.setattr(onednn, '_onednn_version', lambda include: 'MAJOR=3 MINOR=3 PATCH=0')
    assert onednn._key(*toolchain) not in (key, other_compiler)


def _group_writable(path):
    path.chmod(path.stat().st_mode | stat.S_IWGRP)
    return 'is writable by group or others'


def _other_uid(path):
    if os.geteuid() != 0:
        pytest.skip('chown to another user needs root')
    os.chown(path, 65534, -1)
    return 'is owned by uid 65534, not by this user'


@pytest.mark.parametrize('spoil', [_group_writable, _other_uid])
@pytest.mark.parametrize('what', ['file', 'directory'])
def test_a_library_another_user_could_have_written_is_not_loaded(fake_cxx, spoil, what):
    cached, why = onednn._library()
    assert why == '' and len(fake_cxx()) == 1  # built into the cache
    assert stat.S_IMODE(cached.parent.stat().st_mode) == 0o700
    spoiled = cached if what == 'file' else cached.parent
    expected = f'{spoiled} {spoil(spoiled)}'
    with pytest.warns(UserWarning) as warned:
        path, why = onednn._library()
    # a fresh build, in a directory of its own that only this user can write
    assert expected in why
    assert path.name == cached.name and path.parent != cached.parent
    assert len(fake_cxx()) == 2 and Path(fake_cxx()[1]).parent == path.parent
    assert path.parent.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [str(w.message) for w in warned] == [
        f'ljax: not loading the cached oneDNN kernels ({why}): building a private copy in '
        f'{path.parent} instead'
    ]
    assert hasattr(onednn._open(path), 'LjaxOnednnConvForward')  # and loads
    shutil.rmtree(path.parent)
    if what == 'file':  # and the loader itself refuses the spoiled file
        with pytest.raises(RuntimeError, match=f'refusing to load the oneDNN kernels: {expected}'):
            onednn._open(cached)


def test_the_build_command_with_a_spoiled_cache_builds_privately_and_says_so(fake_cxx):
    cached, _ = onednn._library()
    _group_writable(cached)
    done = _python(*BUILD)
    assert done.returncode == 1
    why = f'{cached} is writable by group or others (mode 775)'
    assert done.stdout.splitlines() == [
        f'ljax: built the oneDNN kernels, but not into the cache ({why}): every process will '
        'build its own'
    ]
    private = Path(fake_cxx()[1]).parent
    warning = f'not loading the cached oneDNN kernels ({why}): building a private copy in {private}'
    assert warning in done.stderr
    assert not private.exists()  # removed once loaded


def _waiting_on(lock):
    """How many processes wait for the flock on the file `lock` (from /proc/locks)."""
    inode = f':{os.stat(lock).st_ino}'
    with open('/proc/locks') as f:
        return sum('->' in line and line.split()[6].endswith(inode) for line in f)


def test_processes_started_together_build_once(fake_cxx, tmp_path):
    # This test holds the lock until both processes wait for it: without the lock, or without
    # looking for the library once it is held, both would build.
    directory = tmp_path / 'cache' / 'onednn'
    directory.mkdir(parents=True, mode=0o700)
    lock = os.open(directory / '.lock', os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    procs = [
        subprocess.Popen(
            [sys.executable, *BUILD], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'FAKE_CXX_SLEEP': '1'},
        )
        for _ in range(2)
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while _waiting_on(directory / '.lock') < 2 and time.monotonic() < deadline:
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
        assert _waiting_on(directory / '.lock') == 2
    finally:
        os.close(lock)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and Path(paths.pop()).parent == directory
    assert len(fake_cxx()) == 1  # one build


def test_a_cpp_error_becomes_a_python_exception():
    assert onednn.available(), onednn.reason()
    x, w, _ = _inputs((1, 5, 5, 2), (3, 3, 2, 3))
    geometry = ((1, 1), ((1, 1), (1, 1)), (1, 1))
    # An output shape the convolution does not have: oneDNN throws creating the primitive.
    bad = jax.jit(lambda x, w: onednn._call('fwd', x, w, (1, 4, 4, 3), geometry))
    with pytest.raises(jax.errors.JaxRuntimeError, match='ljax onednn conv: oneDNN: could not'):
        np.asarray(bad(x, w))
    # 3-D operands: the handler's own error
    flat = jax.jit(lambda x, w: onednn._call('fwd', x[0], w, (5, 5, 3), geometry))
    with pytest.raises(jax.errors.JaxRuntimeError, match='ljax onednn conv: expected 2-D'):
        np.asarray(flat(x, w))
    # and the process carries on
    want = lax.conv_general_dilated(x, w, (1, 1), geometry[1], dimension_numbers=DN)
    _close(onednn.conv(x, w, (1, 1), geometry[1]), want)
