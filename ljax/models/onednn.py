"""2-D convolutions on oneDNN for XLA:CPU: an FFI custom call, with its gradients.

XLA:CPU's own convolution kernels are slower than oneDNN's (the library PyTorch calls on CPU):
on ResNet-32's 3x3 layers its forward, input gradient and weight gradient took 1.3x, 1.7x and
2.6x torch's time (docs/RESULTS.md, issue 11), and nothing in XLA's flags changed that. This module
runs the convolution itself on oneDNN through XLA's FFI and leaves every other op to XLA.

- `available()`: whether the oneDNN kernels can run here. On first use the C++ source
  (`ljax/csrc/onednn_conv.cc`) is compiled with the system C++ compiler against the oneDNN headers
  and library of the `onednn-cpu-gomp` / `onednn-devel-cpu-gomp` wheels (`pip install
  'ljax[cpu]'`) and jaxlib's FFI headers, into ljax's cache (`ljax.cache`: `$LJAX_CACHE`, else
  `~/.cache/ljax`), keyed by the source, the versions and the paths; later processes load the
  cached library. If anything is missing it returns False, `reason()` says what, and on a CPU
  backend one warning says so; `LJAX_ONEDNN=0` turns the kernels off (no warning).
- `supports(...)`: the convolutions it runs: 2-D, float32, flax's NHWC / HWIO / NHWC layouts, no
  input dilation, no groups, non-negative padding, no zero-sized dimension.
- `conv(x, w, strides, padding, dilation)`: the convolution, differentiable in reverse mode
  (`jax.custom_vjp`: the input gradient and the weight gradient are oneDNN's backward
  primitives). Forward-mode differentiation (`jax.jvp`) is not defined for it: use
  `method='xla'` in `ljax.models.layers.conv_general_dilated` for that.

Results equal `lax.conv_general_dilated`'s up to float rounding (tests/test_onednn.py). The FFI
targets exist only for CPU, so `ljax.models.layers` stages this path with
`lax.platform_dependent`: GPU and TPU lowerings never see it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import site
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

SOURCE = Path(__file__).resolve().parent.parent / 'csrc' / 'onednn_conv.cc'
ENV_SWITCH = 'LJAX_ONEDNN'
DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
_TARGETS = {
    'fwd': ('ljax_onednn_conv_forward', 'LjaxOnednnConvForward'),
    'dx': ('ljax_onednn_conv_backward_data', 'LjaxOnednnConvBackwardData'),
    'dw': ('ljax_onednn_conv_backward_weights', 'LjaxOnednnConvBackwardWeights'),
}
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


def _library() -> Path:
    """The compiled library, building it if the cache lacks it. Raises RuntimeError saying why
    it cannot."""
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
    source = SOURCE.read_bytes()
    key = hashlib.sha256(
        b'\0'.join(
            [
                source,
                jax.__version__.encode(),
                jaxlib.version.__version__.encode(),
                str(include).encode(),
                str(lib_dir).encode(),
                cxx.encode(),
            ]
        )
    ).hexdigest()[:16]
    out = Path(cache.root()) / f'onednn_conv-{key}.so'
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix='.onednn_conv-', suffix='.so')
    os.close(fd)
    cmd = [
        cxx, '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
        f'-I{jax.ffi.include_dir()}', f'-I{include / "include"}',
        str(SOURCE), '-o', tmp,
        f'-L{lib_dir}', '-ldnnl', f'-Wl,-rpath,{lib_dir}',
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ['(no output)'])[-1]
            raise RuntimeError(f'building the oneDNN kernels failed: {tail}')
        os.replace(tmp, out)  # atomic: concurrent builders (several processes) agree
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=None)
def _register() -> bool:
    global _reason
    if os.environ.get(ENV_SWITCH, '1') == '0':
        _reason = f'turned off by {ENV_SWITCH}=0'
        return False
    try:
        path = _library()
        handle = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in _TARGETS.values():
            jax.ffi.register_ffi_target(
                name, jax.ffi.pycapsule(getattr(handle, symbol)), platform='cpu'
            )
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
