"""What keeps a workdir to one run of one input: a lock, content fingerprints, early checks.

- `check_usable(workdir, writes)`: a workdir that is a file, or cannot be written, is one
  `WorkdirError` line before anything is written (call it with the config checks).
- `lock(workdir)`: `fcntl.flock` on `workdir/.lock`, non-blocking, held until `release(workdir)` or
  the process ends (the kernel drops it when a killed process's descriptor closes, so a stale lock
  file never blocks). A second process gets a `WorkdirLockedError` naming the holder's pid.
- `check_free(workdir)`: that refusal up front, before the model is built; takes nothing.
- `fingerprint(tree)`: SHA-256 over a pytree's arrays (paths, dtypes, shapes, bytes): two files that
  hold the same arrays (a .pth and its cached .npz) have the same fingerprint.
- `run_identity(...)`: what config.json pins beside the config: the pretrained fingerprint and the
  dataset's identity.
- `clean_temp_files(workdir)`: removes the temporary files a killed export left beside
  jackpot.npz / results.json / pretrained.npz.
- `load_npz(path, what)`: an exported .npz, or one `ValueError` line when it is empty or corrupt.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import os
from typing import Any, Mapping

import numpy as np

LOCK_FILE = '.lock'
_TEMP_PATTERNS = ('.*.npz.*.tmp', '*.json.tmp', '*.npz.tmp')
_held: dict[str, int] = {}  # realpath of workdir -> open descriptor holding the flock


class WorkdirError(ValueError):
    """The workdir cannot hold this run (a file, unwritable, read-only); the message is one line."""


class WorkdirLockedError(WorkdirError):
    """Another live process holds the workdir's lock."""


# ----------------------------------------------------------------------------- checks


def check_usable(workdir: str, writes: bool = True) -> None:
    """Raise WorkdirError unless `workdir` is (or can be made) a directory this process may write.

    writes=False (evaluate mode) only refuses a workdir that exists and is not a directory.
    Creates nothing.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(
            f'workdir {workdir} is a file, not a directory; pass another --workdir'
        )
    if not writes:
        return
    probe = workdir
    while not os.path.exists(probe):  # the nearest existing ancestor must let us create it
        parent = os.path.dirname(os.path.abspath(probe))
        if parent == os.path.abspath(probe):
            break
        probe = parent
    if not os.path.isdir(probe):
        raise WorkdirError(
            f'workdir {workdir}: {probe} is a file, not a directory; pass another --workdir'
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        why = 'is on a read-only file system' if _read_only(probe) else 'is not writable'
        where = workdir if probe == workdir else f'{workdir} ({probe})'
        raise WorkdirError(
            f'workdir {where} {why}; pass a writable --workdir (copy the run there to resume it)'
        )


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# ----------------------------------------------------------------------------- lock


def lock(workdir: str) -> None:
    """Take workdir/.lock for this process (creating workdir); idempotent within one process.

    Raises WorkdirLockedError (one line, the holder's pid) when another process holds it. In a
    multi-host run only JAX process 0 locks (the others share its workdir).
    """
    key = os.path.realpath(workdir)
    if key in _held or _secondary_process():
        return
    os.makedirs(workdir, exist_ok=True)
    fd = _flock(workdir, os.O_CREAT)
    os.ftruncate(fd, 0)
    os.write(fd, f'{os.getpid()}\n'.encode())
    _held[key] = fd


def check_free(workdir: str) -> None:
    """The WorkdirLockedError `lock` would raise, before anything is built (a second run on a busy
    workdir stops at once, not after compiling its model); creates and holds nothing."""
    key = os.path.realpath(workdir)
    if key in _held or _secondary_process():
        return
    if not os.path.exists(os.path.join(workdir, LOCK_FILE)):
        return
    try:
        fd = _flock(workdir, 0)
    except FileNotFoundError:
        return  # removed meanwhile: nobody holds it
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _flock(workdir: str, flags: int) -> int:
    """A descriptor of workdir/.lock holding its exclusive flock; WorkdirLockedError when another
    process holds it."""
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        holder = _read_holder(path)
        raise WorkdirLockedError(
            f'workdir {workdir} is in use by another run ({holder}); wait for it to finish, '
            'or pass another --workdir'
        ) from None
    return fd


def _secondary_process() -> bool:
    """In a multi-host run every process shares the workdir: only process 0 takes the lock."""
    import jax

    return jax.process_count() > 1 and jax.process_index() != 0


def _read_holder(path: str) -> str:
    try:
        with open(path) as f:
            pid = f.read().strip()
        return f'pid {pid}' if pid.isdigit() else 'pid unknown'
    except OSError:
        return 'pid unknown'


def release(workdir: str) -> None:
    """Drop this process's lock on workdir (no-op when it holds none). The .lock file stays."""
    fd = _held.pop(os.path.realpath(workdir), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ----------------------------------------------------------------------------- identity


def fingerprint(tree: Any) -> str:
    """SHA-256 (hex) of a pytree of arrays: each leaf's path, dtype, shape and C-order bytes.

    Independent of where the arrays live (numpy, jax) and of the file they came from.
    """
    import jax

    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    h = hashlib.sha256()
    for path, leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f'{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n'.encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes of a.tobytes(), without the copy
    return h.hexdigest()


def run_identity(config, *, variables=None, train=None, test=None) -> dict:
    """What config.json pins besides the config: {'pretrained_sha256', 'data'}.

    variables: the pretrained variables actually used (after conversion), or None (pretrain).
    train, test: the `data.Batches` of the run: their split sizes and, for data held in memory,
      the SHA-256 of the whole split (streamed ImageNet: sizes only; its layout is pinned apart).
    """
    out: dict[str, Any] = {}
    if variables is not None:
        out['pretrained_sha256'] = fingerprint(variables)
    out['data'] = {
        'dataset': config.dataset,
        'train_examples': None if train is None else train.total_examples,
        'test_examples': None if test is None else test.total_examples,
        'num_examples': [config.get('train_examples'), config.get('eval_examples')],
        # Whole splits, not this process's share: a run may resume on another layout.
        'train_sha256': None if train is None else train.content_sha256,
        'test_sha256': None if test is None else test.content_sha256,
    }
    return out


def identity_changes(saved: Mapping, now: Mapping) -> list[str]:
    """Human-readable differences between two `run_identity` dicts (keys absent in `saved` pass)."""
    changes = []
    if 'pretrained_sha256' in saved and saved['pretrained_sha256'] != now.get('pretrained_sha256'):
        changes.append(
            f'the pretrained weights changed (sha256 {str(saved["pretrained_sha256"])[:12]} '
            f'there vs {str(now.get("pretrained_sha256"))[:12]} now)'
        )
    old, new = saved.get('data', {}), now.get('data', {})
    for key in sorted(set(old) & set(new)):
        if old[key] != new[key]:
            changes.append(f'the data changed ({key} {old[key]!r} there vs {new[key]!r} now)')
    return changes


# ----------------------------------------------------------------------------- exports


def clean_temp_files(workdir: str) -> list[str]:
    """Remove the `*.tmp` files a killed export left in workdir (nothing else); returns them."""
    removed = []
    for pattern in _TEMP_PATTERNS:
        for path in glob.glob(os.path.join(glob.escape(workdir), pattern)):
            if os.path.isfile(path) and path not in removed:
                os.remove(path)
                removed.append(path)
    return removed


def load_npz(path: str, what: str) -> dict:
    """`convert.load_variables_npz(path)`, or ValueError '<what>: <path> is empty/corrupt ...'."""
    from ljax import convert

    try:
        if os.path.getsize(path) == 0:
            raise ValueError('the file is empty')
        return convert.load_variables_npz(path)
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, OSError: all mean unreadable
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise ValueError(
            f'{what}: cannot read {path} ({reason}); it is truncated or corrupt: export it again '
            '(rerun the search in its workdir) or pass another --config.jackpot=PATH'
        ) from None
