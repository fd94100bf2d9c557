"""Orbax checkpoints of a run: the search (or training) state plus a JSON `meta` item, and the
run's config saved beside them so that a workdir is never mixed between two configs.

A save that is killed leaves an `N.orbax-checkpoint-tmp` directory that orbax ignores (and removes
on the next start, `cleanup_tmp_directories=True`), so a rerun restores the last finished step.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = 'config.json'
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


def _normalise(value):
    return json.loads(json.dumps(value, default=str))


def check_or_write_config(workdir: str, config: dict) -> None:
    """Write workdir/config.json, or refuse when it holds a run of a different config."""
    path = os.path.join(workdir, CONFIG_FILE)
    config = _normalise(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
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
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Checkpoints:
    """`save(step, state, meta)` / `restore(abstract_state) -> (step, state, meta)` in workdir/checkpoints."""

    def __init__(self, workdir: str, max_to_keep: int = 2):
        self.manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, 'checkpoints')),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, cleanup_tmp_directories=True, create=True
            ),
            item_names=('state', 'meta'),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        state = jax.tree.map(np.asarray, jax.device_get(state))
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_normalise(meta))
            ),
            force=True,
        )

    def restore(self, abstract_state: Any):
        step = self.manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
            jax.device_get(abstract_state),
        )
        try:
            out = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'checkpoint at step {step} in {self.manager.directory} does not fit this '
                f'model/config ({str(e).splitlines()[0][:200]}); use another --workdir'
            ) from None
        return step, out.state, out.meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
