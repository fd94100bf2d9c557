"""ljax's on-disk cache: PyTorch checkpoints converted to .npz, downloaded checkpoints, and the
compiled oneDNN convolution kernels. `$LJAX_CACHE`, else `~/.cache/ljax`."""

from __future__ import annotations

import os

ENV = 'LJAX_CACHE'


def root() -> str:
    return os.environ.get(ENV, os.path.join(os.path.expanduser('~'), '.cache', 'ljax'))
