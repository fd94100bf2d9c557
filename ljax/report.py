"""What a finished search reports: kept counts per layer, mask overlap, a table and results.json."""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np


def kept_per_layer(mask: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """{layer: {'kept', 'total', 'sparsity'}} for a flat {layer path: bool mask}."""
    out = {}
    for name, m in mask.items():
        kept, total = int(np.sum(m)), int(np.size(m))
        out[name] = {'kept': kept, 'total': total, 'sparsity': 1.0 - kept / total}
    return out


def achieved_sparsity(mask: Mapping[str, np.ndarray]) -> float:
    total = sum(int(np.size(m)) for m in mask.values())
    return 1.0 - sum(int(np.sum(m)) for m in mask.values()) / total


def overlap(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Fraction of the kept positions of `a` that `b` keeps too (the paper's mask overlap)."""
    shared = sum(int(np.sum(np.asarray(a[n]) & np.asarray(b[n]))) for n in a)
    kept = sum(int(np.sum(a[n])) for n in a)
    return shared / max(kept, 1)


def results_table(results: dict) -> str:
    lines = [
        f'{"":<34}{"top-1 (%)":>10}',
        f'{"dense (pre-trained)":<34}{100 * results["dense_accuracy"]:>10.2f}',
        f'{"one-shot magnitude, no search":<34}{100 * results["magnitude_accuracy"]:>10.2f}',
        f'{"lottery jackpot":<34}{100 * results["jackpot_accuracy"]:>10.2f}',
        '',
        f'sparsity {100 * results["sparsity"]:.2f}% of {results["prunable_weights"]:,} prunable '
        f'weights, {results["epochs"]} epochs, {results["wall_seconds"]:.0f} s, overlap with the '
        f'magnitude mask {100 * results["overlap_with_magnitude"]:.1f}%',
        '',
        f'{"layer":<40}{"kept":>10}{"total":>11}{"sparsity":>10}',
    ]
    for name, row in results['kept_per_layer'].items():
        lines.append(
            f'{name:<40}{row["kept"]:>10,}{row["total"]:>11,}{100 * row["sparsity"]:>9.2f}%'
        )
    return '\n'.join(lines)


def write_json(path: str, payload: dict) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)
