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
    top5 = 'jackpot_top5_accuracy' in results
    rows = [
        ('dense (pre-trained)', 'dense'),
        ('one-shot magnitude, no search', 'magnitude'),
        ('  + BN statistics re-estimated', 'magnitude_bn'),
        ('one-shot Wanda, no search', 'wanda'),
        ('  + BN statistics re-estimated', 'wanda_bn'),
        ('lottery jackpot', 'jackpot'),
    ]
    lines = [f'{"":<34}{"top-1 (%)":>10}' + (f'{"top-5 (%)":>10}' if top5 else '')]
    for label, key in rows:
        if results.get(f'{key}_accuracy') is None:
            continue
        line = f'{label:<34}{100 * results[f"{key}_accuracy"]:>10.2f}'
        if top5 and f'{key}_top5_accuracy' in results:
            line += f'{100 * results[f"{key}_top5_accuracy"]:>10.2f}'
        lines.append(line)
    lines += [
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


def save_figure(fig, directory: str, name: str) -> str:
    """Writes `fig` as PNG `directory/name` atomically (a temporary file, then a rename)."""
    path = os.path.join(directory, name)
    fig.tight_layout()
    fig.savefig(path + '.tmp.png', dpi=100, format='png')
    os.replace(path + '.tmp.png', path)
    return path


def plot_results(results: dict, directory: str) -> list[str]:
    """PNG plots of a finished search in `directory`; returns their paths.

    accuracy.png: jackpot test accuracy per epoch against dense and the one-shot baselines;
    kept_per_layer.png: the fraction of weights each layer keeps; flips.png: mask flips per epoch.
    """
    # Figure objects render to files without pyplot: a caller's backend (a notebook's inline
    # figures) is left as it is.
    from matplotlib.figure import Figure

    def subplots(figsize):
        fig = Figure(figsize=figsize)
        return fig, fig.add_subplot()

    history = results['history']
    epochs = [row['epoch'] for row in history]
    paths = []

    def save(fig, name):
        paths.append(save_figure(fig, directory, name))

    fig, ax = subplots((6, 4))
    curve = [100 * r['jackpot_accuracy'] for r in history]
    final = f': {curve[-1]:.2f}%' if curve else ''
    ax.plot(epochs, curve, 'o-', label=f'lottery jackpot{final}')
    # the axis spans the jackpot and dense, so the gap between them shows; baselines far below
    # keep their number in the legend
    near = curve + ([100 * results['dense_accuracy']] if results.get('dense_accuracy') else [])
    low, high = (min(near) - 1.0, max(near) + 0.5) if near else (None, None)
    styles = {
        'dense': ('k', '--'),
        'magnitude': ('tab:red', ':'),
        'magnitude_bn': ('tab:orange', ':'),
        'wanda': ('tab:purple', '-.'),
        'wanda_bn': ('tab:pink', '-.'),
    }
    labels = {
        'dense': 'dense',
        'magnitude': 'one-shot magnitude',
        'magnitude_bn': 'one-shot magnitude, BN re-estimated',
        'wanda': 'one-shot Wanda',
        'wanda_bn': 'one-shot Wanda, BN re-estimated',
    }
    for key, (color, style) in styles.items():
        if results.get(f'{key}_accuracy') is not None:
            value = 100 * results[f'{key}_accuracy']
            below = ' (below the axis)' if low is not None and value < low else ''
            ax.axhline(
                value, color=color, linestyle=style, label=f'{labels[key]}: {value:.2f}%{below}'
            )
    ax.set(xlabel='search epoch', ylabel='test top-1 (%)', title='accuracy per epoch')
    if low is not None:
        ax.set_ylim(low, high)
    ax.legend(fontsize=8)
    save(fig, 'accuracy.png')

    layers = results['kept_per_layer']
    fig, ax = subplots((6, max(3, 0.25 * len(layers))))
    ax.barh(range(len(layers)), [1 - r['sparsity'] for r in layers.values()])
    ax.set_yticks(range(len(layers)), list(layers), fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel='fraction kept', title=f'kept per layer ({100 * results["sparsity"]:.1f}% sparse)')
    save(fig, 'kept_per_layer.png')

    fig, ax = subplots((6, 4))
    ax.plot(epochs, [r.get('flips', 0) for r in history], 'o-')
    ax.set(xlabel='search epoch', ylabel='mask flips', title='mask flips per epoch')
    save(fig, 'flips.png')
    return paths


# ------------------------------------------------------------------------- sentence encoders
def text_table(results: dict) -> str:
    """The rows of a text search (`ljax.textjob`): held-out cosine to the dense embeddings,
    top-k neighbour agreement, supersense probe accuracy, sparsity and seconds; then the step
    timing."""
    k = results['neighbours']
    header = (
        f'{"":<44}{"cosine":>8}{f"top-{k} NN":>10}{"probe":>8}{"sparsity":>10}{"seconds":>9}'
    )
    lines = [header]
    for row in results['rows']:
        lines.append(
            f'{row["name"]:<44}{row["cosine"]:>8.4f}{100 * row[f"nn{k}"]:>9.1f}%'
            f'{100 * row["probe_accuracy"]:>7.1f}%{100 * row["sparsity"]:>9.1f}%'
            f'{row["seconds"]:>9.0f}'
        )
    t = results['step_time']
    lines += [
        '',
        f'{results["search_glosses"]:,} search glosses x {results["epochs"]} epochs '
        f'({results["steps"]} steps of {results["batch_size"]}), {results["held_out_glosses"]:,} '
        f'held-out glosses, probe fitted on {results["probe_glosses"]:,} dense embeddings; '
        f'search {results["wall_seconds"] / 60:.1f} min',
        f'search step {t["search_step_seconds"]:.3f} s vs dense forward + backward '
        f'{t["dense_step_seconds"]:.3f} s on a batch {tuple(t["batch_shape"])}: '
        f'{t["search_over_dense"]:.2f}x (median of {t["rounds"]}, alternated)',
    ]
    return '\n'.join(lines)


def plot_text_results(results: dict, directory: str) -> list[str]:
    """embedding_metrics.png: the jackpot's held-out cosine, neighbour agreement and probe
    accuracy per epoch against each one-shot row; loss.png: the search loss (1 - cosine) per
    epoch. Returns the paths."""
    from matplotlib.figure import Figure

    history = results['history']
    epochs = [row['epoch'] for row in history]
    k = results['neighbours']
    paths = []

    def save(fig, name):
        paths.append(save_figure(fig, directory, name))

    fig = Figure(figsize=(13, 4))
    for i, (key, label) in enumerate(
        (('cosine', 'cosine to dense'), (f'nn{k}', f'top-{k} neighbour agreement'),
         ('probe_accuracy', 'supersense probe accuracy'))
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        ax.plot(epochs, [r.get(f'jackpot_{key}') for r in history], 'o-', label='lottery jackpot')
        for j, row in enumerate(r for r in results['rows'] if r['method'] != 'jackpot'):
            ax.axhline(row[key], color=f'C{j + 1}', linestyle=':', label=row['name'])
        ax.set(xlabel='search epoch', title=label)
        if i == 0:
            ax.legend(fontsize=6)
    save(fig, 'embedding_metrics.png')

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ax.plot(epochs, [r['loss'] for r in history], 'o-')
    ax.set(xlabel='search epoch', ylabel='train loss (1 - cosine)', title='search loss per epoch')
    ax.set_yscale('log')
    save(fig, 'loss.png')
    return paths
