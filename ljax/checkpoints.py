"""Orbax checkpoints of a run: the search (or training) state plus a JSON `meta` item, and the
run's config (and input identity) saved beside them so a workdir is never mixed between two runs.

A save that is killed leaves an `N.orbax-checkpoint-tmp` directory that orbax ignores (and removes
on the next start, `cleanup_tmp_directories=True`), so a rerun restores the last finished step.

Orbax 0.12.8 does not notice flipped bytes in an array's data, so every save also stores, inside its
`meta` item (committed atomically with the state), the SHA-256 of the state's arrays and of the
meta. `restore` verifies it; a step that fails to load or to verify is reported in one line, moved
to `checkpoints/corrupt/<step>-<time>` (never deleted) and the next older step is tried.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ljax import workdir as workdir_lib
from ljax.workdir import fingerprint  # noqa: F401  (re-exported: checkpoints.fingerprint)

CONFIG_FILE = 'config.json'
IDENTITY_KEY = '_identity'  # config.json: what run_identity() pinned (pretrained sha256, data)
CHECKSUM_KEY = '_ljax_checksums'  # meta item: {'state': sha256, 'meta': sha256}
CORRUPT_DIR = 'corrupt'
# Fields that change how a run is watched, not what it computes: they may differ on a rerun.
VOLATILE_FIELDS = frozenset(
    {
        'log_every_steps',
        'checkpoint_every_steps',
        'progress',
        'mode',
        'max_to_keep',
        'coordinator_address',
        'num_processes',
        'process_id',
        'distributed',
    }
)


class ConfigMismatchError(ValueError):
    pass


class CheckpointWriteError(RuntimeError):
    """A checkpoint step failed to reach the disk twice."""


def _normalise(value):
    return json.loads(json.dumps(value, default=str))


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_or_write_config(workdir: str, config: dict, identity: dict | None = None) -> None:
    """Lock workdir for this process, then write workdir/config.json or check it.

    Refuses (ConfigMismatchError, one line) a workdir whose config.json holds another config, or,
    when `identity` (see `workdir.run_identity`) is given, other pretrained contents or data. Takes
    `workdir.lock(workdir)` first (WorkdirLockedError when another process runs there; release it
    with `workdir.release(workdir)`), and removes the temporary files of a killed export.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    config = _normalise(config)
    identity = _normalise(identity) if identity is not None else None
    workdir_lib.lock(workdir)
    workdir_lib.clean_temp_files(workdir)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigMismatchError(
                f'workdir {workdir}: cannot read {path} ({e}); use another --workdir'
            ) from None
        saved_identity = saved.pop(IDENTITY_KEY, None)
        keys = (set(saved) | set(config)) - VOLATILE_FIELDS
        diff = sorted(k for k in keys if saved.get(k) != config.get(k))
        if diff:
            shown = ', '.join(
                f'{k}={saved.get(k)!r} there vs {config.get(k)!r} now' for k in diff[:4]
            )
            raise ConfigMismatchError(
                f'workdir {workdir} holds a run of a different config ({shown}); '
                'use another --workdir, or delete that one to start over'
            )
        if identity is not None and saved_identity is not None:
            changes = workdir_lib.identity_changes(saved_identity, identity)
            if changes:
                raise ConfigMismatchError(
                    f'workdir {workdir} holds a run of different inputs with the same config: '
                    f'{"; ".join(changes)}; use another --workdir, or restore the original inputs'
                )
        return
    if identity is not None:
        config = {**config, IDENTITY_KEY: identity}
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _missing_file(e: BaseException | None) -> bool:
    """Whether an error (or its cause) says a file or directory orbax was writing disappeared:
    FileNotFoundError, tensorstore's NOT_FOUND, or orbax's 'Checkpoint directory does not exist'
    (its post-save check of the item being written; seen once in CI, in the ImageNet notebook
    test, while the save was otherwise complete)."""
    while e is not None:
        text = str(e)
        if (
            isinstance(e, FileNotFoundError)
            or 'NOT_FOUND' in text
            or text.startswith('Checkpoint directory does not exist')
        ):
            return True
        e = e.__cause__ or e.__context__
    return False


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _meta_digest(meta: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _abstract(state: Any) -> Any:
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), jax.device_get(state)
    )


class Checkpoints:
    """`save(step, state, meta)` / `restore(abstract_state) -> (step, state, meta) | None`.

    In workdir/checkpoints; `max_to_keep` newest steps are kept. Every step is verified on restore.
    """

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
        self.max_to_keep = max_to_keep
        self.manager = self._open()
        self._pending: tuple[int, Any, dict] | None = None  # the last save until it is settled

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep, cleanup_tmp_directories=True, create=True
            ),
            item_names=('state', 'meta'),
        )

    def _fresh_manager(self) -> None:
        """Replace the manager (one whose save failed re-raises that failure on every wait)."""
        for finish in (self.manager.wait_until_finished, self.manager.close):
            try:
                finish()
            except Exception:
                pass
        self.manager = self._open()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Save asynchronously, with the checksums `restore` verifies (in meta[CHECKSUM_KEY]).

        The previous save is settled first: a step that did not reach the disk is written again.
        """
        state = jax.tree.map(np.asarray, jax.device_get(state))
        meta = _normalise({k: v for k, v in meta.items() if k != CHECKSUM_KEY})
        meta[CHECKSUM_KEY] = {'state': fingerprint(state), 'meta': _meta_digest(meta)}
        self._settle()
        self._write(step, state, meta)
        self._pending = (step, state, meta)

    def _write(self, step: int, state: Any, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def _settle(self) -> None:
        """Wait for the last save. If its step is not on disk afterwards because a file vanished
        (checkpoints/ or the step being written was deleted, or a write went elsewhere in orbax's
        background thread, which orbax only logs), say so in one line and write that step again,
        synchronously; if that fails too, raise CheckpointWriteError. Any other failure (a full
        disk, no permission) is raised as it is: writing again would fail alike."""
        pending, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
            error = None
        except Exception as e:
            error = e
        deleted = not os.path.isdir(self.directory)
        if error is not None or deleted:
            self._fresh_manager()  # recreates checkpoints/
        if error is not None and (pending is None or not _missing_file(error)):
            raise error
        if pending is None:
            if deleted:
                _say(f'{self.directory} was deleted during the run; recreated it (earlier steps are lost)')
            return
        step = pending[0]
        if self._on_disk(step):
            return
        if not deleted and not os.path.isdir(self.directory):  # deleted as we looked
            deleted = True
            self._fresh_manager()
        if deleted:
            _say(
                f'{self.directory} was deleted during the run; recreated it and writing step {step} '
                'again (earlier steps are lost)'
            )
        else:
            why = _first_line(error) if error is not None else 'it is missing after the save'
            _say(f'checkpoint step {step} did not reach {self.directory} ({why}); writing it again')
        try:
            self._write(*pending)
            self.manager.wait_until_finished()
        except Exception as e:
            self._fresh_manager()
            raise CheckpointWriteError(
                f'checkpoint step {step} could not be written to {self.directory}: {_first_line(e)}'
            ) from e

    def _on_disk(self, step: int) -> bool:
        """Whether `step` is among the steps in checkpoints/; False when checkpoints/ vanishes
        while orbax lists it (it checks that the directory exists, then lists it)."""
        try:
            self.manager.reload()
            return step in self.manager.all_steps()
        except Exception as e:
            if not _missing_file(e):
                raise
            return False

    def restore(self, abstract_state: Any):
        """The newest step that loads and verifies, as (step, state, meta); None when there is none.

        Each step that fails is reported on stderr in one line and moved to checkpoints/corrupt/.
        Steps saved without checksums (older ljax) are accepted when they load.
        """
        abstract = _abstract(abstract_state)
        moved = 0
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = self._load_verified(step, abstract)
            except Exception as e:  # anything that stops a step loading means it cannot be used
                reason = _first_line(e)
                where = self._move_aside(step)
                moved += 1
                _say(
                    f'checkpoint step {step} is unusable ({reason}); moved it to {where}, '
                    'trying the previous step'
                )
                continue
            return step, state, meta
        if moved:
            _say(
                f'no intact checkpoint left in {self.directory} ({moved} moved to '
                f'{CORRUPT_DIR}/); starting over from step 0'
            )
        return None

    def _load_verified(self, step: int, abstract: Any):
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        meta = dict(out.meta)
        sums = meta.pop(CHECKSUM_KEY, None)
        if sums is not None:
            if _meta_digest(meta) != sums.get('meta'):
                raise ValueError('its meta item does not match its checksum')
            if fingerprint(out.state) != sums.get('state'):
                raise ValueError("its arrays do not match their SHA-256 checksum")
        return out.state, meta

    def _move_aside(self, step: int) -> str:
        src = os.path.join(self.directory, str(step))
        stamp = time.strftime('%Y%m%dT%H%M%S')
        dst = os.path.join(self.directory, CORRUPT_DIR, f'{step}-{stamp}')
        if jax.process_index() == 0 and os.path.exists(src):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            n = 1
            while os.path.exists(dst):
                dst, n = os.path.join(self.directory, CORRUPT_DIR, f'{step}-{stamp}-{n}'), n + 1
            os.rename(src, dst)
        self.manager.reload()
        return os.path.relpath(dst, os.path.dirname(self.directory))

    def wait(self) -> None:
        """Block until the last save is on disk (written again if it failed; see `save`)."""
        self._settle()

    def close(self) -> None:
        self.wait()
        self.manager.close()
