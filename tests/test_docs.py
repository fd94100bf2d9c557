"""The docs say what the tree does.

README's headline table equals the default run's results (docs/results/default_fashion_mnist.json,
the `results.json` of `python main.py --config configs/fashion_mnist.py`); README's Python snippet
runs and prints what README says it prints; README and docs/RESULTS.md stay short, name no commit,
date or round of work, and every docs/results (and docs/figures) file they name exists.
"""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, 'README.md')
RESULTS = os.path.join(ROOT, 'docs', 'RESULTS.md')
RELIABILITY = os.path.join(ROOT, 'docs', 'RELIABILITY.md')
RESULTS_DIR = os.path.join(ROOT, 'docs', 'results')
FIGURES_DIR = os.path.join(ROOT, 'docs', 'figures')
DEFAULT_RUN = os.path.join(RESULTS_DIR, 'default_fashion_mnist.json')

# The headline table's rows, in order: how each label starts, and its key in results.json.
HEADLINE_ROWS = [
    ('dense', 'dense'),
    ('one-shot magnitude pruning, no search', 'magnitude'),
    ('one-shot magnitude pruning, bn statistics re-estimated', 'magnitude_bn'),
    ('one-shot wanda, no search', 'wanda'),
    ('one-shot wanda, bn statistics re-estimated', 'wanda_bn'),
    ('lottery jackpot', 'jackpot'),
]

# A short commit hash: 7 or more lowercase hex digits with at least one letter and one digit.
COMMIT = re.compile(r'\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,}\b')
DATE = re.compile(r'\b\d{4}-\d{2}-\d{2}\b|\b20\d{6}T\d{4,6}\b')
SESSION = re.compile(r'\bsessions?\b', re.IGNORECASE)


def _read(path):
    with open(path, encoding='utf-8') as f:
        return f.read()


def _section(text, heading):
    """The text under `## heading` up to the next `## ` heading."""
    start = text.index(f'\n## {heading}\n')
    end = text.find('\n## ', start + 1)
    return text[start : end if end >= 0 else len(text)]


def _table_rows(text, header_start):
    """Rows (lists of stripped cells) of the first markdown table whose header starts so."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(header_start):
            rows = []
            for row in lines[i + 2 :]:
                if not row.startswith('|'):
                    break
                rows.append([c.strip() for c in row.strip().strip('|').split('|')])
            return rows
    raise AssertionError(f'no table whose header starts with {header_start!r}')


def _percent(cell):
    m = re.fullmatch(r'\**([0-9]+\.[0-9]{2})%\**', cell)
    assert m, f'not a percentage with 2 decimals: {cell!r}'
    return m.group(1)


def test_readme_headline_table_is_the_default_runs_results():
    results = json.loads(_read(DEFAULT_RUN))
    rows = _table_rows(_section(_read(README), 'The default run'), '| | test top-1 | top-5 |')
    assert len(rows) == len(HEADLINE_ROWS), rows
    for (label, top1, top5), (start, key) in zip(rows, HEADLINE_ROWS):
        plain = label.replace('*', '').lower()
        assert plain.startswith(start), (label, start)
        assert _percent(top1) == f'{100 * results[f"{key}_accuracy"]:.2f}', (label, key)
        assert _percent(top5) == f'{100 * results[f"{key}_top5_accuracy"]:.2f}', (label, key)
    jackpot_label = rows[-1][0]
    assert f'{100 * results["sparsity"]:.2f}% of {results["prunable_weights"]:,} prunable' in (
        jackpot_label
    )


def test_readme_numbers_around_the_headline_table_are_the_default_runs():
    results = json.loads(_read(DEFAULT_RUN))
    text = _section(_read(README), 'The default run')
    assert f'The search takes {results["wall_seconds"]:.0f} s' in text
    assert f'keeps {100 * results["overlap_with_magnitude"]:.1f}% of the magnitude mask' in text
    gain = 100 * (results['jackpot_accuracy'] - results['magnitude_bn_accuracy'])
    assert f'gains {gain:.0f} points' in text
    assert results['epochs'] == 10 and '10 search epochs' in text
    assert results['target_sparsity'] == 0.9 and '90% sparsity' in text


def test_default_run_file_has_the_keys_of_results_json():
    results = json.loads(_read(DEFAULT_RUN))
    for key in (
        'model', 'dataset', 'jackpot_accuracy', 'jackpot_top5_accuracy', 'sparsity',
        'target_sparsity', 'prunable_weights', 'epochs', 'steps', 'wall_seconds',
        'overlap_with_magnitude', 'kept_per_layer', 'history', 'devices', 'processes',
        'platform', 'dtype', 'nm', 'nonfinite_steps',
    ):  # fmt: skip
        assert key in results, key
    assert (results['model'], results['dataset']) == ('mlp', 'fashion_mnist')
    kept = sum(layer['kept'] for layer in results['kept_per_layer'].values())
    total = sum(layer['total'] for layer in results['kept_per_layer'].values())
    assert total == results['prunable_weights']
    assert results['sparsity'] == pytest.approx(1 - kept / total)


@pytest.mark.parametrize('path, limit', [(README, 160), (RESULTS, 520)])
def test_docs_stay_short(path, limit):
    assert len(_read(path).splitlines()) <= limit


@pytest.mark.parametrize('path', [README, RESULTS, RELIABILITY])
def test_docs_name_no_commit_date_or_session(path):
    text = _read(path)
    assert not COMMIT.findall(text), COMMIT.findall(text)
    assert not DATE.findall(text), DATE.findall(text)
    assert not SESSION.findall(text), SESSION.findall(text)


def _named_files(text):
    """(pattern, directory) for every docs/results or docs/figures file a doc names."""
    named = set()
    for m in re.finditer(r'(?:docs/)?(results|figures)/([\w.*\-]+\.\w+)', text):
        named.add((m.group(2), RESULTS_DIR if m.group(1) == 'results' else FIGURES_DIR))
    # Bare names of result files (`study_seeds.csv`): CSV and logs live only in docs/results.
    for m in re.finditer(r'(?<![\w/.\-])([\w\-]+\.(?:csv|log))\b', text):
        named.add((m.group(1), RESULTS_DIR))
    return named


@pytest.mark.parametrize('path', [README, RESULTS])
def test_every_results_file_named_exists(path):
    named = _named_files(_read(path))
    assert named
    missing = [name for name, d in sorted(named) if not glob.glob(os.path.join(d, name))]
    assert not missing


def test_results_files_are_named_by_what_they_hold():
    for name in os.listdir(RESULTS_DIR):
        assert not SESSION.search(name) and not re.search(r'round\d', name), name


def _readme_snippet():
    """The Python API section's code and the output README says it prints."""
    api = _section(_read(README), 'Python API')
    code = re.search(r'```python\n(.*?)```', api, re.S).group(1)
    printed = re.search(r'```text\n(.*?)```', api, re.S).group(1)
    return code, printed


def test_readme_python_snippet_prints_what_readme_says(tmp_path):
    code, printed = _readme_snippet()
    env = dict(os.environ)
    # A reader's plain CPU: one device, not the 4 virtual devices of conftest.py.
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
    env['XLA_FLAGS'] = ' '.join(flags)
    if not flags:  # an empty (or blank) XLA_FLAGS is read as a file name
        del env['XLA_FLAGS']
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONWARNINGS'] = 'error::DeprecationWarning:__main__'
    out = subprocess.run(
        [sys.executable, '-c', code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == printed.splitlines(), (out.stdout, printed)
