"""Convolutions that are fast on XLA:CPU, and exact drop-ins for `lax.conv_general_dilated`.

XLA:CPU runs convolutions below what the CPU can do, in two ways (docs/RESULTS.md has the
per-layer profile, `benchmarks/conv_profile.py` makes it):
- its kernels are slower than oneDNN's (the library PyTorch calls) on every shape we measured,
  most in the backward pass: `ljax.models.onednn` runs the convolution on oneDNN through XLA's FFI;
- some shapes collapse (a 3x3 512->512 convolution on a 2x2 map, batch 64, ran at about
  1.6 GFLOP/s; 1x1 weight gradients 3-10x slower than a dot): the same convolution written as
  im2col (one strided slice of the padded input per kernel tap, stacked on the channel axis)
  followed by one matmul runs at matmul speed, and so do its gradients (autodiff of slices and a
  dot is a dot plus pads).

`conv_general_dilated` has `lax.conv_general_dilated`'s signature. Under `jit` it stages the fast
version and XLA's own with `lax.platform_dependent`: the fast one (`cpu_method` says which) runs
where the computation is lowered for CPU, XLA's convolution everywhere else (GPU, TPU), so one
model runs well on both. Shapes neither fast version covers (grouped or transposed convolutions)
always take XLA's path. Users opt in with `ljax.models.layers.Conv` (an `nn.Conv` whose only change
is this function) or by passing `conv_general_dilated=ljax.models.layers.conv_general_dilated` to
their own `nn.Conv`; parameter names, shapes and values are those of `nn.Conv`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jax import lax

from ljax.models import onednn

# `method` values: 'auto' (where lowered for CPU, `cpu_method`'s choice; XLA's convolution
# elsewhere), 'onednn' / 'im2col' / 'xla' (always that one, where it covers the convolution).
METHODS = ('auto', 'onednn', 'im2col', 'xla')

# Measured on XLA:CPU (benchmarks/conv_profile.py, docs/RESULTS.md): 1x1 kernels lose most in the
# weight gradient (4-10x slower than a dot); kernels larger than 1x1 lose badly only on tiny output
# maps (VGG-19's 2x2: about 60x), while on large maps the 9x larger im2col buffer costs more than
# XLA's convolution. So: 1x1 always, otherwise output maps of at most this many pixels.
IM2COL_MAX_OUTPUT_PIXELS = 4
# ... but 1x1 kernels on maps of at least this many pixels per example go to oneDNN where it runs
# them: inside a model, XLA:CPU fuses the elementwise backward of what follows (BatchNorm) into a
# transposed copy that the im2col weight gradient reads, which dominates on large maps. A plain
# train step of ResNet-50 at 224x224, batch 8: all 1x1 as im2col 1660 ms, all on oneDNN 1115 ms,
# im2col on its 7x7 maps only 1062 ms; the ResNet-50 stand-in at 32x32 (maps of 8x8 and less):
# im2col 88 ms, oneDNN 159 ms.
ONEDNN_MIN_1X1_PIXELS = 100


def _normalize_padding(padding, in_spatial, window, strides):
    if isinstance(padding, str):
        return tuple(lax.padtype_to_pads(in_spatial, window, strides, padding))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _spatial(lhs_shape, rhs_shape, dimension_numbers):
    dn = lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
    return (
        tuple(lhs_shape[d] for d in dn.lhs_spec[2:]),
        tuple(rhs_shape[d] for d in dn.rhs_spec[2:]),
    )


def _output_pixels(lhs_shape, rhs_shape, window_strides, padding, rhs_dilation=None,
                   dimension_numbers=None) -> int:
    in_spatial, window = _spatial(lhs_shape, rhs_shape, dimension_numbers)
    dilation = tuple(rhs_dilation or (1,) * len(window))
    dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    pads = _normalize_padding(padding, in_spatial, dilated, window_strides)
    return int(np.prod([
        max(0, (i + lo + hi - dk) // s + 1)
        for i, (lo, hi), dk, s in zip(in_spatial, pads, dilated, window_strides)
    ]))


def im2col_is_faster(lhs_shape, rhs_shape, window_strides, padding, rhs_dilation=None,
                     dimension_numbers=None, *, onednn: bool = False) -> bool:
    """The shape rule of `method='auto'` on CPU: 1x1 kernels (with `onednn`, which runs this
    convolution, on output maps of fewer than `ONEDNN_MIN_1X1_PIXELS` pixels per example), or
    outputs of at most `IM2COL_MAX_OUTPUT_PIXELS` pixels per example."""
    _, window = _spatial(lhs_shape, rhs_shape, dimension_numbers)
    pixels = _output_pixels(lhs_shape, rhs_shape, window_strides, padding, rhs_dilation,
                            dimension_numbers)  # fmt: skip
    if all(k == 1 for k in window):
        return not onednn or pixels < ONEDNN_MIN_1X1_PIXELS
    return pixels <= IM2COL_MAX_OUTPUT_PIXELS


def supports_im2col(lhs_dilation, feature_group_count, batch_group_count) -> bool:
    """Whether `im2col_conv` covers a convolution: no input dilation, no groups."""
    return (
        all(d == 1 for d in (lhs_dilation or ()))
        and feature_group_count == 1
        and batch_group_count == 1
    )


def im2col_conv(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated` without input dilation or groups, as im2col + one matmul.

    Any number of spatial dimensions and any dimension numbers (inputs are transposed to
    channels-last, which is free for flax's NHWC / HWIO). Padding: 'SAME', 'VALID' or
    (low, high) pairs, negative allowed. Returns the same shape and dtype as lax's.
    """
    nspatial = lhs.ndim - 2
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs_spec, rhs_spec, out_spec = dn
    # Channels-last views: x (N, *spatial, C), w (*window, C, O).
    x = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    w = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    strides = tuple(window_strides)
    dilation = tuple(rhs_dilation or (1,) * nspatial)
    window = w.shape[:nspatial]
    in_spatial = x.shape[1:-1]
    dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    pads = _normalize_padding(padding, in_spatial, dilated, strides)
    config = ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0))
    x = lax.pad(x, jnp.zeros((), x.dtype), config)
    padded = x.shape[1:-1]
    out_spatial = tuple(
        max(0, (p - dk) // s + 1) for p, dk, s in zip(padded, dilated, strides)
    )
    n, c = x.shape[0], x.shape[-1]
    if all(k == 1 for k in window):
        # A 1x1 convolution needs no patches: subsample (if strided), then a dot.
        cols = lax.slice(
            x,
            (0,) * x.ndim,
            (n, *((o - 1) * s + 1 for o, s in zip(out_spatial, strides)), c),
            (1, *strides, 1),
        )
    else:
        taps = []
        for offset in np.ndindex(*window):
            start = tuple(i * d for i, d in zip(offset, dilation))
            limit = tuple(st + (o - 1) * s + 1 for st, o, s in zip(start, out_spatial, strides))
            taps.append(lax.slice(x, (0, *start, 0), (n, *limit, c), (1, *strides, 1)))
        # Channel index of the patch is (tap, c): the order of w's rows after the reshape below.
        cols = jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]
    w2 = w.reshape(-1, w.shape[-1])
    y = lax.dot_general(
        cols,
        w2,
        (((cols.ndim - 1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    # y is (N, *spatial, O); out_spec says where batch, feature and spatial dims go.
    order = (out_spec[0], out_spec[1], *out_spec[2:])  # out dim index of y's (N, O, *spatial)
    y_dims = (0, y.ndim - 1, *range(1, y.ndim - 1))
    perm = [0] * y.ndim
    for src, dst in zip(y_dims, order):
        perm[dst] = src
    return jnp.transpose(y, perm)


def _pads_and_dilation(lhs, rhs, window_strides, padding, rhs_dilation, dimension_numbers):
    """Padding as (low, high) pairs and the kernel dilation, per spatial dimension."""
    in_spatial, window = _spatial(lhs.shape, rhs.shape, dimension_numbers)
    dilation = tuple(rhs_dilation or (1,) * len(window))
    dilated = tuple((k - 1) * d + 1 for k, d in zip(window, dilation))
    return _normalize_padding(padding, in_spatial, dilated, window_strides), dilation


def _onednn_covers(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, batch_group_count,
                   preferred_element_type) -> bool:
    if lhs.ndim != 4:
        return False
    pads, _ = _pads_and_dilation(lhs, rhs, window_strides, padding, rhs_dilation, dimension_numbers)
    return onednn.supports(
        lhs, rhs, pads, lhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
        preferred_element_type,
    )  # fmt: skip


def cpu_method(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    preferred_element_type=None,
) -> str:
    """What `method='auto'` runs where the computation is lowered for CPU: 'im2col' where
    `im2col_is_faster` (1x1 kernels, unless on large maps that oneDNN runs; tiny output maps:
    there oneDNN is no faster than im2col, VGG-19's 2x2 block 426 against 297 ms in
    `benchmarks/conv_profile.py`), else 'onednn' where `onednn.supports` the convolution and
    `onednn.available()`, else 'xla'."""
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, preferred_element_type)  # fmt: skip
    onednn_runs = _onednn_covers(*args) and onednn.available()
    if supports_im2col(lhs_dilation, feature_group_count, batch_group_count) and im2col_is_faster(
        lhs.shape, rhs.shape, window_strides, padding, rhs_dilation, dimension_numbers,
        onednn=onednn_runs,
    ):
        return 'im2col'
    return 'onednn' if onednn_runs else 'xla'


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    method: str = 'auto',
):
    """`lax.conv_general_dilated`, on oneDNN or as im2col + matmul where lowered for CPU.

    method: 'auto' (default): decides per lowering platform with `lax.platform_dependent`:
      `cpu_method`'s choice for 'cpu', `lax.conv_general_dilated` for every other platform (when
      `cpu_method` says 'xla', no switch is staged). 'onednn' / 'im2col' / 'xla' force one of them
      on every platform ('onednn' exists on CPU only).
    Convolutions the forced or chosen version does not cover (for oneDNN: anything but 2-D float32
    NHWC/HWIO without groups or input dilation; for im2col: input dilation, groups) run
    `lax.conv_general_dilated`; so does 'onednn' when `onednn.available()` is False.
    """
    if method not in METHODS:
        raise ValueError(f'method: expected one of {METHODS}, got {method!r}')
    xla = functools.partial(
        lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, preferred_element_type)  # fmt: skip
    if method == 'auto':
        chosen = cpu_method(*args)
    elif method == 'onednn':
        chosen = 'onednn' if _onednn_covers(*args) and onednn.available() else 'xla'
    elif method == 'im2col':
        chosen = 'im2col' if supports_im2col(
            lhs_dilation, feature_group_count, batch_group_count
        ) else 'xla'
    else:
        chosen = 'xla'
    if chosen == 'xla':
        return xla(lhs, rhs)
    if chosen == 'onednn':
        pads, dilation = _pads_and_dilation(
            lhs, rhs, window_strides, padding, rhs_dilation, dimension_numbers
        )
        fast = lambda x, w: onednn.conv(x, w, window_strides, pads, dilation)
    else:
        fast = functools.partial(
            im2col_conv,
            window_strides=window_strides,
            padding=padding,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    if method != 'auto':
        return fast(lhs, rhs)
    return lax.platform_dependent(lhs, rhs, cpu=fast, default=xla)


class Conv(nn.Conv):
    """`flax.linen.Conv` that runs `conv_general_dilated` above (oneDNN or im2col on CPU).

    Same fields, parameters (`kernel`, `bias`), initialisers and results as `nn.Conv`; only the
    convolution primitive differs, so checkpoints move freely between the two.
    """

    conv_general_dilated: nn.linear.ConvGeneralDilatedT | None = conv_general_dilated
