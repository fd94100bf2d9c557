"""2-D convolutions on oneDNN for XLA:CPU: an FFI custom call, with its gradients.

XLA:CPU's own convolution kernels are slower than oneDNN's (the library PyTorch calls on CPU):
on ResNet-32's 3x3 layers its forward, input gradient and weight gradient took 1.3x, 1.7x and
2.6x torch's time (docs/RESULTS.md, issue 11), and nothing in XLA's flags changed that. This module
runs the convolution itself on oneDNN through XLA's FFI and leaves every other op to XLA.

- `available()`: whether the oneDNN kernels can run here. On first use the C++ sources
  (`ljax/csrc/onednn_conv.cc`; `ljax/csrc/topk_mask.cc`, the exact top-k mask of one layer,
  `ljax.masks`' 'native' selection; `ljax/csrc/all_finite.cc`, the train steps' finite check of
  their gradients, `ljax.reductions.native_all_finite`: the last two need no oneDNN but ship in
  the same library) are
  compiled with the system C++ compiler (`$CXX`, else g++) against
  the oneDNN headers and library of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels (`pip
  install 'ljax[cpu]'`) and jaxlib's FFI headers, into ljax's cache; later processes load the
  cached library. If anything is missing it returns False, `reason()` says what, and on a CPU
  backend one warning says so; `LJAX_ONEDNN=0` turns the kernels off (no warning).
- `python -m ljax.models.onednn --build` does that ahead of time (README, CI): it builds or finds
  the library in the cache and prints its path (exit status 0), or prints one line saying why
  there is none and that XLA's kernels will run (1; also 1 when the cache cannot be trusted, as
  the library then built is private to the command, and each process will build its own).
- `supports(...)`: the convolutions it runs: 2-D, float32, flax's NHWC / HWIO / NHWC layouts, no
  input dilation, no groups, non-negative padding, no zero-sized dimension.
- `conv(x, w, strides, padding, dilation)`: the convolution, differentiable in reverse mode
  (`jax.custom_vjp`: the input gradient and the weight gradient are oneDNN's backward
  primitives). Forward-mode differentiation (`jax.jvp`) is not defined for it: use
  `method='xla'` in `ljax.models.layers.conv_general_dilated` for that.

The library is native code loaded into the process, so:
- It lives in `<cache>/onednn/` (`ljax.cache`: `$LJAX_CACHE`, else `~/.cache/ljax`), created with
  mode 0700, as `onednn_conv-<key>.so`; the key hashes the source, the compiler flags, jax's and
  jaxlib's versions, the compiler's path and version (`--version`'s first line), oneDNN's version
  (`dnnl_version.h`) and the header and library paths, so a change to any of them builds anew.
- It is loaded only if it and that directory are this user's and writable by no one else (the
  file is checked once open, and loaded through that descriptor). Otherwise a warning says why
  and a fresh copy is built in a new private directory (`tempfile.mkdtemp`, 0700), loaded, and
  removed.
- One process builds at a time (`fcntl.flock` on `<cache>/onednn/.lock`); one that waited finds
  the library and loads it. The compiler writes a temporary file, renamed into place (atomic).
- Every C++ exception inside the kernels becomes an XLA FFI error, so a Python exception
  (`jax.errors.JaxRuntimeError`), never an abort.

Results equal `lax.conv_general_dilated`'s up to float rounding (tests/test_onednn.py). The FFI
targets exist only for CPU, so `ljax.models.layers` stages this path with
`lax.platform_dependent`: GPU and TPU lowerings never see it.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import hashlib
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import jaxlib.version

from ljax import cache
import numpy as np

_CSRC = Path(__file__).resolve().parent.parent / 'csrc'
# the library: the convolutions, the top-k mask of `ljax.masks` (its 'native' selection) and the
# finite check of `ljax.reductions`
SOURCES = (_CSRC / 'onednn_conv.cc', _CSRC / 'topk_mask.cc', _CSRC / 'all_finite.cc')
HEADERS = (_CSRC / 'thread_pool.h',)  # included by the sources: part of the cache key
ENV_SWITCH = 'LJAX_ONEDNN'
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
_TARGETS = {
    'fwd': ('ljax_onednn_conv_forward', 'LjaxOnednnConvForward'),
    'dx': ('ljax_onednn_conv_backward_data', 'LjaxOnednnConvBackwardData'),
    'dw': ('ljax_onednn_conv_backward_weights', 'LjaxOnednnConvBackwardWeights'),
    'topk': ('ljax_topk_masks', 'LjaxTopkMasks'),
    'finite': ('ljax_all_finite', 'LjaxAllFinite'),
}
_FLAGS = ('-O2', '-std=c++17', '-shared', '-fPIC', '-w')
_BUILD_TIMEOUT_S = 600
_reason = ''


def reason() -> str:
    """Why `available()` is False ('' when it is True or has not been asked)."""
    return _reason


def _find(relative: str, roots: Sequence[str]) -> Path | None:
    for root in roots:
        if root and (Path(root) / relative).exists():
            return Path(root)
    return None


def _prefixes() -> list[str]:
    # The onednn wheels install into the environment's data directory (include/, lib/), or the
    # user's with `pip install --user`.
    return [sys.prefix, sysconfig.get_path('data'), site.USER_BASE, '/usr/local', '/usr']


def _toolchain() -> tuple[str, Path, Path]:
    """(the C++ compiler, oneDNN's prefix (its include/), oneDNN's library directory). Raises
    RuntimeError saying what is missing."""
    if sys.platform != 'linux':
        raise RuntimeError(f'the oneDNN kernels are built on Linux only (this is {sys.platform})')
    include = _find('include/oneapi/dnnl/dnnl.hpp', _prefixes())
    lib = _find('lib/libdnnl.so', _prefixes()) or _find(
        'lib/x86_64-linux-gnu/libdnnl.so', ['/usr']
    )
    if include is None or lib is None:
        raise RuntimeError(
            "oneDNN's headers or library are not installed: pip install 'ljax[cpu]' "
            '(the onednn-cpu-gomp and onednn-devel-cpu-gomp wheels)'
        )
    lib_dir = lib / 'lib' if (lib / 'lib' / 'libdnnl.so').exists() else lib / 'lib/x86_64-linux-gnu'
    cxx = shutil.which(os.environ.get('CXX', 'g++'))
    if cxx is None:
        raise RuntimeError('no C++ compiler (g++, or $CXX) to build the oneDNN kernels')
    return cxx, include, lib_dir


def _compiler_version(cxx: str) -> str:
    """The first line of `cxx --version` (g++ and clang++ both name themselves and their version
    there): an upgraded compiler in the same place must not reuse the old build."""
    try:
        done = subprocess.run([cxx, '--version'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f'{cxx} --version failed: {e}') from e
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f'{cxx} --version failed (exit status {done.returncode})')
    return lines[0]


def _onednn_version(include: Path) -> str:
    """oneDNN's version and commit, from the headers the build compiles against."""
    header = include / 'include/oneapi/dnnl/dnnl_version.h'
    try:
        text = header.read_text()
    except OSError as e:
        raise RuntimeError(f"cannot read oneDNN's version: {e}") from e
    fields = re.findall(r'#define\s+DNNL_VERSION_(MAJOR|MINOR|PATCH|HASH)\s+"?(\w+)', text)
    if not fields:
        raise RuntimeError(f'no DNNL_VERSION_* in {header}')
    return ' '.join(f'{name}={value}' for name, value in fields)


def _key(cxx: str, include: Path, lib_dir: Path) -> str:
    """The library's name in the cache: anything that changes the binary changes it."""
    parts = [
        *(source.read_bytes() for source in SOURCES + HEADERS),
        ' '.join(_FLAGS),
        jax.__version__,
        jaxlib.version.__version__,  # the FFI headers (jax.ffi.include_dir()) come with it
        cxx,
        _compiler_version(cxx),
        _onednn_version(include),
        str(include),
        str(lib_dir),
    ]
    data = b'\0'.join(p if isinstance(p, bytes) else p.encode() for p in parts)
    return hashlib.sha256(data).hexdigest()[:16]


def _directory() -> Path:
    # Its own directory in ljax's cache (which also holds checkpoints): created 0700, with the
    # lock file beside the libraries.
    return Path(cache.root()) / 'onednn'


def _unsafe(st: os.stat_result, path: Path) -> str:
    """Why someone other than this user may have written the file or directory whose status is
    `st` ('' if no one else can have): loading it would run their code in this process."""
    if stat.S_ISLNK(st.st_mode):
        return f'{path} is a symbolic link'
    if st.st_uid != os.geteuid():
        return f'{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})'
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f'{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})'
    return ''


def _compile(cxx: str, include: Path, lib_dir: Path, out: Path) -> None:
    """Compiles the library into `out`: to a temporary name beside it, then renamed into place
    (atomic: a reader sees no library or the whole of it, never a partly written one)."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix='.onednn_conv-', suffix='.so')
    os.close(fd)
    cmd = [
        cxx, *_FLAGS,
        f'-I{jax.ffi.include_dir()}', f'-I{include / "include"}',
        *map(str, SOURCES), '-o', tmp,
        f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}',
    ]  # fmt: skip
    try:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:  # other processes wait on the lock meanwhile
            raise RuntimeError(f'building the oneDNN kernels took over {e.timeout:.0f} s') from e
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
            raise RuntimeError(f'building the oneDNN kernels failed: {tail}')
        # The linker creates its output with the umask's mode: group-writable under umask 002,
        # which `_unsafe` would refuse in every later process.
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _library() -> tuple[Path, str]:
    """The library to load, built if the cache lacks it, and '' if it is the cache's, else why the
    cache could not be used (it is then a private build, in a directory of its own). Raises
    RuntimeError saying why no library can be built."""
    cxx, include, lib_dir = _toolchain()
    name = f'onednn_conv-{_key(cxx, include, lib_dir)}.so'
    directory = _directory()
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        why = _unsafe(directory.stat(), directory)
    except OSError as e:  # a read-only home, say: the build can still be private
        why = f'cannot create {directory}: {e.strerror or e}'
    if not why:
        out = directory / name
        # One build at a time (processes on several hosts sharing a home, parallel tests): a
        # process that waited here finds the library its predecessor built. 0600: another user
        # must not be able to open the lock file and hold the lock.
        lock = os.open(directory / '.lock', os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.lexists(out):
                _compile(cxx, include, lib_dir, out)
            why = _unsafe(out.lstat(), out)
            if not why:
                return out, ''
        finally:
            os.close(lock)  # releases the lock
    private = Path(tempfile.mkdtemp(prefix='ljax-onednn-'))  # mode 0700: this user's alone
    warnings.warn(
        f'ljax: not loading the cached oneDNN kernels ({why}): building a private copy in '
        f'{private} instead',
        stacklevel=3,
    )
    out = private / name
    try:
        _compile(cxx, include, lib_dir, out)
    except BaseException:
        shutil.rmtree(private, ignore_errors=True)
        raise
    return out, why


def _open(path: Path) -> ctypes.CDLL:
    """Loads the library at `path` if only this user can have written it. The check is on the
    open file, loaded through /proc/self/fd: the file checked is the file loaded, whatever
    happens to the path in between."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        why = _unsafe(os.fstat(fd), path)
        if why:
            raise RuntimeError(f'refusing to load the oneDNN kernels: {why}')
        handle = ctypes.CDLL(f'/proc/self/fd/{fd}')
    except BaseException:
        os.close(fd)
        raise
    # The descriptor stays open: glibc knows a loaded library by the name it was loaded as, and a
    # later load through a reused /proc/self/fd/N would be handed this library back.
    return handle


def _load() -> tuple[Path, str]:
    """Builds or finds the library, loads it and registers its FFI targets: (its path, '' or why
    it is a private build)."""
    path, private = _library()
    try:
        handle = _open(path)
    finally:
        if private:  # loaded (or not): no other process can use this copy
            shutil.rmtree(path.parent, ignore_errors=True)
    for name, symbol in _TARGETS.values():
        capsule = jax.ffi.pycapsule(getattr(handle, symbol))
        jax.ffi.register_ffi_target(name, capsule, platform='cpu')
    return path, private


@functools.lru_cache(maxsize=None)
def _register() -> bool:
    global _reason
    if os.environ.get(ENV_SWITCH, '1') == '0':
        _reason = f'turned off by {ENV_SWITCH}=0'
        return False
    try:
        _load()
    except (RuntimeError, OSError, AttributeError) as e:
        _reason = str(e)
        if jax.default_backend() == 'cpu':  # once per process (lru_cache); silent on GPU / TPU
            warnings.warn(
                f'ljax: convolutions run on XLA:CPU\'s own kernels (1.3-3x slower here): {e}',
                stacklevel=2,
            )
        return False
    _reason = ''
    return True


def available() -> bool:
    """Whether the oneDNN convolution can run (building it on first use); see `reason()`."""
    return _register()


def supports(
    lhs,
    rhs,
    padding,
    lhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    preferred_element_type=None,
) -> bool:
    """Whether `conv` covers this `lax.conv_general_dilated` call (padding already as pairs)."""
    if lhs.ndim != 4 or rhs.ndim != 4:
        return False
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        return False
    if preferred_element_type not in (None, jnp.float32, np.float32):
        return False
    if feature_group_count != 1 or batch_group_count != 1:
        return False
    if any(d != 1 for d in (lhs_dilation or ())):
        return False
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if dn != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, DIMENSION_NUMBERS):
        return False
    if any(lo < 0 or hi < 0 for lo, hi in padding):
        return False
    return 0 not in lhs.shape and 0 not in rhs.shape


def _output_shape(x_shape, w_shape, strides, padding, dilation):
    n, h, w_, _ = x_shape
    kh, kw, _, o = w_shape
    out = [
        (size + lo + hi - ((k - 1) * d + 1)) // s + 1
        for size, (lo, hi), k, d, s in zip((h, w_), padding, (kh, kw), dilation, strides)
    ]
    return (n, *out, o)


def _call(direction, a, b, out_shape, geometry):
    strides, padding, dilation = geometry
    name = _TARGETS[direction][0]
    return jax.ffi.ffi_call(
        name, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method='sequential'
    )(
        a,
        b,
        strides=np.asarray(strides, np.int64),
        padding_lo=np.asarray([lo for lo, _ in padding], np.int64),
        padding_hi=np.asarray([hi for _, hi in padding], np.int64),
        dilation=np.asarray(dilation, np.int64),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, geometry):
    return _call('fwd', x, w, _output_shape(x.shape, w.shape, *geometry), geometry)


def _conv_fwd(x, w, geometry):
    return _conv(x, w, geometry), (x, w)


def _conv_bwd(geometry, residuals, dy):
    x, w = residuals
    dx = _call('dx', dy, w, x.shape, geometry)
    dw = _call('dw', x, dy, w.shape, geometry)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, w, strides: Sequence[int], padding, dilation: Sequence[int] | None = None):
    """The 2-D convolution of x (N, H, W, C) with w (KH, KW, C, O), float32, on oneDNN.

    padding: (low, high) pairs per spatial dimension (non-negative). Needs `available()`.
    """
    if not available():
        raise RuntimeError(f'ljax oneDNN convolution unavailable: {reason()}')
    geometry = (
        tuple(int(s) for s in strides),
        tuple((int(lo), int(hi)) for lo, hi in padding),
        tuple(int(d) for d in (dilation or (1, 1))),
    )
    return _conv(x, w, geometry)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m ljax.models.onednn --build`: builds (or finds) the library ahead of time,
    whatever LJAX_ONEDNN says."""
    parser = argparse.ArgumentParser(prog='python -m ljax.models.onednn', description=main.__doc__)
    parser.add_argument(
        '--build', action='store_true', required=True,
        help="build the oneDNN kernels into ljax's cache (or find them there) and print its path",
    )  # fmt: skip
    parser.parse_args(argv)
    try:
        path, private = _load()
    except (RuntimeError, OSError, AttributeError) as e:
        print(f"ljax: no oneDNN kernels, convolutions will run on XLA:CPU's own kernels: {e}")
        return 1
    if private:  # built and loaded, but gone with this process: each process will build again
        print(
            f'ljax: built the oneDNN kernels, but not into the cache ({private}): every process '
            'will build its own'
        )
        return 1
    print(path)
    return 0


if sys.argv[:1] == ['-m']:
    # `python -m ljax.models.onednn`: the package ljax.models imports this module (through
    # layers) before runpy runs it as __main__, and runpy warns about that; harmless here, as
    # the __main__ copy hands over to this one.
    warnings.filterwarnings(
        'ignore', r"'ljax\.models\.onednn' found in sys\.modules", RuntimeWarning
    )

if __name__ == '__main__':
    from ljax.models import onednn

    sys.exit(onednn.main())
