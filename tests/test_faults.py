"""The fault table of benchmarks/faults.py as tests: each fault's promised outcome must hold.

Every row starts main.py in subprocesses: marked slow. docs/RELIABILITY.md shows the table `python benchmarks/faults.py` prints.
"""

import os
import shutil
import sys

import pytest

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks')
)

import faults  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    lab = faults.Lab(str(tmp_path_factory.mktemp('faults')))
    yield lab
    shutil.rmtree(lab.root, ignore_errors=True)


@pytest.mark.parametrize(
    'fn',
    [
        pytest.param(fn, id=name) for name, _, fn in faults.FAULTS
    ],
)
def test_fault(lab, fn):
    row = fn(lab)
    assert row.ok, faults.table([row], lab.root)
