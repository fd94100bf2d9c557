"""SparseGPT (Frantar & Alistarh, ICML 2023): one-shot pruning that also updates the kept weights.

For one layer with input X (rows: samples and positions) and kernel W, SparseGPT looks for a
sparse W' with small reconstruction error ||X W - X W'||^2, whose Hessian in W is (twice)
H = X^T X, shared by every output. Working through the inputs in order, it prunes input q of an
output (by the mask) and moves the error onto the inputs not yet visited with the Optimal Brain
Surgeon update for the inverse Hessian of those inputs; the rows of the upper Cholesky factor of
H^-1 hold exactly these sequential inverses, so one factorisation serves the whole layer.

In ljax layout a kernel is (in, out), the transpose of torch's (out, in) W: the paper's columns
(inputs) are our rows and its rows (outputs) our columns. `sparsegpt_prune` works on (in, out);
internally it holds the paper's (out, in) orientation.

`sparsegpt_prune` (one layer, given its Hessian), following the paper and its reference code:
1. dead inputs (H_ii = 0) get H_ii = 1 and their weights set to 0; then lambda = percdamp *
   mean(diag H) is added to the diagonal;
2. U = the upper Cholesky factor of H^-1 (float64 for the factorisations only: a calibration
   Gram from fewer rows than inputs is singular but for the dampening, and float32 Cholesky of
   such matrices loses or fails; everything else is float32);
3. the inputs are processed in blocks of `blocksize` ("lazy batch updates"). Unstructured
   ("adaptive mask selection"): at the start of each block, from the weights as updated so far,
   the block's entries over ALL outputs together with the smallest w^2 / U_qq^2 are pruned,
   exactly n - round((1 - sparsity) n) of the block's n entries (the paper's Algorithm 1 and the
   reference select over W[:, block], not per output: the sparsity of one output may vary,
   that of every block is exact). N:M: at every M-th input, each output keeps the N of the next
   M inputs with the largest w^2 / U_qq^2 (from the weights as updated so far);
4. for each input q of the block: err = (w_q - mask_q w_q) / U_qq per output, the block's later
   inputs get w -= err * U[q, later]; after the block, the inputs after it get
   w -= Err_block @ U[block, after].
Ties in the selection: higher score kept, equal scores to the lower index (output-major for
the unstructured block), as `ljax.nm` and `ljax.masks` do.

`sparsegpt` prunes a model sequentially, as the paper does: kernels in the order the model uses
them, each one's Hessian measured on the model whose earlier kernels are already pruned and
updated (one calibration pass per group of kernels reading the same input, such as query / key /
value). Convolutions are pruned as their (kh*kw*in, out) matrix of patch features
(`ljax.calibration.input_grams`); N:M groups then run along `in` for each (kh, kw), as in
`ljax.nm`.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from ljax import calibration, masks, nm as nm_lib
from ljax.modelfn import ModelFn
from ljax.sparsity import flatten, num_kept, unflatten


def _check_options(sparsity, nm, blocksize, percdamp, shapes: Mapping[str, tuple]) -> None:
    if (sparsity is None) == (nm is None):
        raise ValueError('sparsegpt: pass exactly one of sparsity= (fraction removed) and nm=')
    ok = isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool)
    if not ok or blocksize < 1:
        raise ValueError(f'sparsegpt: blocksize must be a positive int, got {blocksize!r}')
    if not isinstance(percdamp, numbers.Real) or not 0 <= percdamp < np.inf:
        raise ValueError(f'sparsegpt: percdamp must be a finite float >= 0, got {percdamp!r}')
    if nm is not None:
        nm_lib.check_nm(nm, shapes)
        if blocksize % nm[1]:
            raise ValueError(
                f'sparsegpt: blocksize {blocksize} must be a multiple of M = {nm[1]} with '
                f'nm={nm[0]}:{nm[1]} (a group of M inputs may not straddle two blocks)'
            )
    elif not isinstance(sparsity, numbers.Real) or not 0 <= sparsity <= 1:
        raise ValueError(f'sparsegpt: sparsity must be a fraction in [0, 1], got {sparsity!r}')


def _upper_inverse_factor(hessian: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    """(U float32 (in, in) upper triangular with U^T U = (H + lambda I)^-1, dead (in,) bool)."""
    h = np.asarray(hessian, np.float64)
    h = (h + h.T) / 2  # a Gram summed in float32 may be asymmetric in the last bits
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0  # an input that is always 0: any weight there does nothing
    h[np.diag_indices_from(h)] += percdamp * np.mean(np.diag(h))
    # With J the reversal permutation and J H J = L L^T (lower Cholesky), H^-1 = U^T U for
    # U = J L^-1 J, upper triangular with a positive diagonal: the upper Cholesky factor of H^-1
    # from one factorisation and one triangular inverse (no explicit H^-1, factorised again).
    try:
        low = scipy.linalg.cholesky(h[::-1, ::-1], lower=True)
    except np.linalg.LinAlgError:
        low = None
    if low is None or not np.all(np.isfinite(low)):
        raise ValueError(
            f'sparsegpt: the Hessian dampened by percdamp={percdamp} is not positive definite '
            '(is it X^T X? raise percdamp)'
        )
    inv, info = scipy.linalg.lapack.dtrtri(low, lower=1)
    if info != 0:
        raise ValueError(f'sparsegpt: the Hessian is singular (percdamp={percdamp}; raise it)')
    return np.ascontiguousarray(inv[::-1, ::-1], np.float32), dead


def sparsegpt_prune(
    weights,
    hessian,
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT on one layer: (new weights float32 (in, out), mask bool (in, out), True = kept).

    weights: a kernel (in, out) (any float dtype; computed in float32). hessian: (in, in), X^T X
    of the layer's inputs (`ljax.calibration.input_grams`; its scale does not matter). Exactly
    one of `sparsity` (fraction removed, in [0, 1], exact in every block of `blocksize` inputs
    over all outputs together) and `nm` = (N, M) (N kept of every M consecutive inputs of each
    output; in % M == 0 and blocksize % M == 0). percdamp: dampening, as a fraction of the mean
    diagonal of H. The new weights are 0 exactly where the mask is False (and at dead inputs);
    the kept ones are updated to compensate. Module docstring for the algorithm.
    """
    shape, hshape = np.shape(weights), np.shape(hessian)
    if len(shape) != 2:
        raise ValueError(f'sparsegpt: weights must be a 2-D (in, out) kernel, got shape {shape}')
    if hshape != (shape[0], shape[0]):
        raise ValueError(
            f'sparsegpt: hessian must be (in, in) = {(shape[0], shape[0])} for weights {shape}, '
            f'got {hshape}'
        )
    _check_options(sparsity, nm, blocksize, percdamp, {'weights': shape})
    w = np.asarray(weights, np.float32).T.copy()  # (out, in): the paper's orientation
    h = np.asarray(hessian)
    if not (np.all(np.isfinite(w)) and np.all(np.isfinite(h))):
        raise ValueError('sparsegpt: weights and hessian must be finite (no NaN / inf)')
    u, dead = _upper_inverse_factor(h, float(percdamp))
    w[:, dead] = 0.0
    rows, cols = w.shape
    keep = np.ones_like(w, dtype=bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        d1 = np.diag(u1)
        err = np.zeros_like(w1)
        k1 = np.ones_like(w1, dtype=bool)
        if nm is None:
            k1 = masks.host_topk_mask(w1**2 / d1**2, num_kept(w1.size, float(sparsity)))
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                k1[:, g] = _top_per_row(w1[:, g] ** 2 / d1[g] ** 2, nm[0])
            q = np.where(k1[:, i], w1[:, i], 0.0)
            err[:, i] = (w1[:, i] - q) / d1[i]
            w1[:, i:] -= err[:, i, None] * u1[i, i:]  # the OBS update on this block's later inputs
            w1[:, i] = q  # exactly 0 where pruned, not a rounding residue
        w[:, i1:i2] = w1
        keep[:, i1:i2] = k1
        w[:, i2:] -= err @ u[i1:i2, i2:]  # the block's updates on every later input, at once
    return jnp.asarray(w.T), jnp.asarray(keep.T)


def _top_per_row(scores: np.ndarray, k: int) -> np.ndarray:
    """bool, True on the k highest of each row (ties to the lower index)."""
    order = np.argsort(-scores, axis=1, kind='stable')
    out = np.zeros(scores.shape, bool)
    np.put_along_axis(out, order[:, :k], True, axis=1)
    return out


def sparsegpt(
    fn: ModelFn,
    variables: Mapping,
    batches: Iterable,
    names: Sequence[str],
    *,
    sparsity: float | None = None,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> tuple[dict, dict[str, jax.Array]]:
    """SparseGPT on the kernels `names` of a model: (params, masks).

    fn, variables: as for `ljax.calibration.input_norms` (a `ModelFn` from
    `ljax.modelfn.model_fn` and {'params': ..., 'batch_stats': ...}); batches: calibration
    batches (x arrays, (x, y, ...) tuples or {'image'/'x': ...} dicts), iterated once per group
    of kernels. Exactly one of `sparsity` (the fraction removed, the same in every kernel) and
    `nm` = (N, M); blocksize, percdamp as `sparsegpt_prune`.

    Sequential: kernels are pruned in the order the model uses them
    (`ljax.calibration.product_groups`); each group's Hessians (`input_grams`, eval mode) are
    measured with every earlier kernel already pruned and updated. A kernel of shape
    (..., in, out) is pruned as its (prod(shape[:-1]), out) matrix (a convolution: its patch
    features) and reshaped back. A kernel used by several products is pruned in the group of
    its first use, on the sum of the Grams of all its uses.

    Returns params: `variables['params']` (nested dict) with every named kernel replaced by its
    pruned and updated values (in its own dtype), and masks: {name: bool array of the kernel's
    shape, True = kept}. ValueError (one line) for bad options, unknown names and kernels whose
    inputs cannot be measured (those of `input_grams`).
    """
    if not isinstance(fn, ModelFn):
        raise ValueError(
            f'sparsegpt: fn must be a ModelFn (ljax.modelfn.model_fn), got {type(fn).__name__}'
        )
    names = list(names)
    if not names:
        raise ValueError('sparsegpt: names is empty; pass the kernels to prune')
    flat = flatten(variables['params'])
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(f'sparsegpt: no parameter {missing[0]!r}; params hold {list(flat)[:6]}')
    shapes = {n: tuple(np.shape(flat[n])) for n in names}
    flat_shapes = {n: (int(np.prod(s[:-1])), s[-1]) for n, s in shapes.items() if len(s) >= 2}
    if len(flat_shapes) < len(names):
        bad = next(n for n in names if n not in flat_shapes)
        raise ValueError(f'sparsegpt: {bad} of shape {shapes[bad]} is not a kernel (..., in, out)')
    _check_options(sparsity, nm, blocksize, percdamp, shapes)
    batches = list(batches)
    if not batches:
        raise ValueError('sparsegpt: no calibration batches')
    stats = variables.get('batch_stats') or {}
    groups = calibration.product_groups(fn, variables, batches[0], names)
    masks: dict[str, jax.Array] = {}
    for group in groups:
        current = {'params': unflatten(flat), 'batch_stats': stats}
        hessians = calibration.input_grams(fn, current, batches, group)
        for n in group:
            w = flat[n]
            new, keep = sparsegpt_prune(
                jnp.reshape(w, flat_shapes[n]),
                hessians[n],
                sparsity=sparsity,
                nm=nm,
                blocksize=blocksize,
                percdamp=percdamp,
            )
            flat[n] = new.reshape(shapes[n]).astype(jnp.result_type(w))
            masks[n] = keep.reshape(shapes[n])
    return unflatten(flat), {n: masks[n] for n in names}
