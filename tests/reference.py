"""Brute-force NumPy references for the exact selections (ranking: score, then lower index)."""

import math

import numpy as np


def rank_order(scores):
    """Flat indices from highest- to lowest-ranked; -0.0 and +0.0 rank equal."""
    s = np.asarray(scores, np.float32).reshape(-1) + np.float32(0.0)
    return np.lexsort((np.arange(s.size), -s.astype(np.float64)))


def topk(scores, k, valid=None):
    order = rank_order(scores)
    if valid is not None:
        order = order[np.asarray(valid).reshape(-1)[order]]
    out = np.zeros(np.size(scores), bool)
    out[order[:k]] = True
    return out.reshape(np.shape(scores))


def restrict(mask, scores, k, rate):
    mask = np.asarray(mask, bool)
    top = topk(scores, k)
    revive, prune = top & ~mask, mask & ~top
    c = int(revive.sum())
    r = min(c, max(0, math.ceil(np.float32(rate) * np.float32(c))))
    come_in = topk(scores, r, revive)
    leave = prune & ~topk(scores, c - r, prune)
    return (mask & ~leave) | come_in
