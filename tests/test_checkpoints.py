"""Checkpoints that verify themselves, config.json pinned by content, the workdir lock."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from ljax import checkpoints, workdir as workdir_lib


def state_at(step):
    return {
        'scores': {'a': np.arange(3000, dtype=np.float32) * step, 'b': np.full((40, 40), step)},
        'step': np.int32(step),
    }


def saved(tmp_path, steps=(1, 2, 3), keep=3):
    ckpt = checkpoints.Checkpoints(str(tmp_path), keep)
    for s in steps:
        ckpt.save(s, state_at(s), {'history': [s], 'wall_seconds': float(s)})
    ckpt.close()
    return os.path.join(str(tmp_path), 'checkpoints')


def largest_data_file(directory, step):
    files = glob.glob(os.path.join(directory, str(step), 'state', '**', 'd', '*'), recursive=True)
    return max(files, key=os.path.getsize)


def restore(tmp_path):
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    try:
        return ckpt.restore(state_at(0))
    finally:
        ckpt.close()


def test_intact_checkpoint_restores_newest_step_and_hides_the_checksums(tmp_path):
    saved(tmp_path)
    step, state, meta = restore(tmp_path)
    assert step == 3 and meta == {'history': [3], 'wall_seconds': 3.0}
    np.testing.assert_array_equal(state['scores']['a'], state_at(3)['scores']['a'])


@pytest.mark.parametrize('damage', ['flip', 'truncate', 'meta'])
def test_damaged_latest_step_is_moved_aside_and_the_previous_one_restored(
    tmp_path, capfd, damage
):
    directory = saved(tmp_path)
    if damage == 'meta':  # valid JSON, other numbers: only the checksum notices
        path = os.path.join(directory, '3', 'meta', 'metadata')
        with open(path) as f:
            meta = json.load(f)
        meta['wall_seconds'] = 99.0
        with open(path, 'w') as f:
            json.dump(meta, f)
    else:
        path = largest_data_file(directory, 3)
        data = bytearray(open(path, 'rb').read())
        if damage == 'flip':
            data[len(data) // 2] ^= 0xFF
        else:
            data = data[: len(data) // 2]
        open(path, 'wb').write(bytes(data))
    step, state, meta = restore(tmp_path)
    assert step == 2 and meta['history'] == [2]
    np.testing.assert_array_equal(state['scores']['a'], state_at(2)['scores']['a'])
    moved = os.listdir(os.path.join(directory, 'corrupt'))
    assert len(moved) == 1 and moved[0].startswith('3-')  # kept, not deleted
    assert not os.path.exists(os.path.join(directory, '3'))
    err = capfd.readouterr().err
    assert 'checkpoint step 3 is unusable' in err and 'moved it to checkpoints/corrupt/3-' in err


def test_no_intact_step_left_starts_over_and_says_so(tmp_path, capfd):
    directory = saved(tmp_path, steps=(1, 2))
    for step in (1, 2):
        open(largest_data_file(directory, step), 'wb').close()
    assert restore(tmp_path) is None
    assert len(os.listdir(os.path.join(directory, 'corrupt'))) == 2
    assert 'starting over from step 0' in capfd.readouterr().err
    # the moved-aside steps do not confuse the next save and restore
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    ckpt.save(5, state_at(5), {'history': []})
    ckpt.close()
    assert restore(tmp_path)[0] == 5


def test_save_recreates_a_deleted_checkpoint_directory(tmp_path, capfd):
    ckpt = checkpoints.Checkpoints(str(tmp_path), 2)
    ckpt.save(1, state_at(1), {})
    ckpt.wait()
    shutil.rmtree(os.path.join(str(tmp_path), 'checkpoints'))
    ckpt.save(2, state_at(2), {})
    ckpt.save(3, state_at(3), {})
    ckpt.close()
    assert 'was deleted during the run; recreated it' in capfd.readouterr().err
    assert restore(tmp_path)[0] == 3


def test_save_recreates_a_checkpoint_directory_deleted_while_orbax_lists_it(
    tmp_path, capfd, monkeypatch
):
    # CI (stop 26): checkpoints/ was deleted after orbax found that it exists and before it listed
    # it (CheckpointManager.reload), so the listing raised FileNotFoundError and ended the run.
    from orbax.checkpoint._src.path import step as step_lib

    ckpt = checkpoints.Checkpoints(str(tmp_path), 2)
    ckpt.save(1, state_at(1), {})
    ckpt.wait()
    original, deleted = step_lib._is_valid_base_path, []

    def exists_then_deleted(path):
        valid = original(path)
        if valid and not deleted:
            deleted.append(str(path))
            shutil.rmtree(str(path))
        return valid

    monkeypatch.setattr(step_lib, '_is_valid_base_path', exists_then_deleted)
    ckpt.save(2, state_at(2), {})
    ckpt.save(3, state_at(3), {})
    ckpt.close()
    assert deleted == [os.path.join(str(tmp_path), 'checkpoints')]
    err = capfd.readouterr().err
    assert 'was deleted during the run; recreated it and writing step 2 again' in err
    assert steps_on_disk(tmp_path) == [2, 3]
    step, state, _ = restore(tmp_path)
    assert step == 3
    np.testing.assert_array_equal(state['scores']['b'], state_at(3)['scores']['b'])


def failing_commits(monkeypatch, times, error=None):
    """Make orbax's last write of a save (commit_success.txt, in its background thread) fail
    `times` times, as it did when TFDS's mock file system was active during the commit."""
    from orbax.checkpoint._src.path import async_path

    original, failed = async_path.write_text, []

    async def write_text(path, text, **kwargs):
        if path.name == 'commit_success.txt' and len(failed) < times:
            failed.append(str(path))
            raise error or FileNotFoundError(2, 'No such file or directory', str(path))
        return await original(path, text, **kwargs)

    monkeypatch.setattr(async_path, 'write_text', write_text)
    return failed


def steps_on_disk(tmp_path):
    directory = tmp_path / 'checkpoints'
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_a_save_whose_commit_fails_is_written_again_at_the_next_save(tmp_path, capfd, monkeypatch):
    failed = failing_commits(monkeypatch, times=1)
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    ckpt.save(1, state_at(1), {'history': [1]})
    ckpt.save(2, state_at(2), {'history': [2]})
    ckpt.close()
    assert len(failed) == 1 and '/1.orbax-checkpoint-tmp/' in failed[0]
    assert steps_on_disk(tmp_path) == [1, 2]
    err = capfd.readouterr().err
    assert 'checkpoint step 1 did not reach' in err and 'writing it again' in err
    assert 'deleted' not in err
    shutil.rmtree(tmp_path / 'checkpoints' / '2')
    step, state, meta = restore(tmp_path)
    assert (step, meta) == (1, {'history': [1]})
    np.testing.assert_array_equal(state['scores']['b'], state_at(1)['scores']['b'])


def test_a_save_whose_item_directory_vanished_before_its_check_is_written_again(
    tmp_path, capfd, monkeypatch
):
    # CI (stop 23): orbax's post-save metadata check found the item's tmp directory gone and raised
    # 'Checkpoint directory does not exist' from its background thread; the run then stopped.
    from orbax.checkpoint._src.metadata import array_metadata_store

    original, failed = array_metadata_store.validate_all_array_metadatas, []

    async def validate(validator, store, directory):
        if not failed:
            failed.append(str(directory))
            raise ValueError(f'Checkpoint directory does not exist: {directory}.')
        return await original(validator, store, directory)

    monkeypatch.setattr(array_metadata_store, 'validate_all_array_metadatas', validate)
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    ckpt.save(1, state_at(1), {'history': [1]})
    ckpt.save(2, state_at(2), {'history': [2]})
    ckpt.close()
    assert len(failed) == 1 and '/1.orbax-checkpoint-tmp/state' in failed[0]
    assert steps_on_disk(tmp_path) == [1, 2]
    assert 'checkpoint step 1 did not reach' in capfd.readouterr().err
    shutil.rmtree(tmp_path / 'checkpoints' / '2')
    step, state, meta = restore(tmp_path)
    assert (step, meta) == (1, {'history': [1]})
    np.testing.assert_array_equal(state['scores']['b'], state_at(1)['scores']['b'])


def test_the_last_save_is_written_again_on_close(tmp_path, monkeypatch):
    failing_commits(monkeypatch, times=1)
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    ckpt.save(1, state_at(1), {})
    ckpt.close()
    assert steps_on_disk(tmp_path) == [1]
    assert restore(tmp_path)[0] == 1


def test_a_full_disk_is_raised_as_it_is_not_written_again(tmp_path, capfd, monkeypatch):
    import errno

    failed = failing_commits(monkeypatch, 1, OSError(errno.ENOSPC, 'No space left on device'))
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    ckpt.save(1, state_at(1), {})
    with pytest.raises(OSError, match='No space left on device'):
        ckpt.save(2, state_at(2), {})
    assert len(failed) == 1 and 'writing it again' not in capfd.readouterr().err
    ckpt.close()


def test_a_step_that_fails_twice_stops_the_run_in_one_line(tmp_path, monkeypatch):
    failing_commits(monkeypatch, times=2)
    ckpt = checkpoints.Checkpoints(str(tmp_path), 3)
    ckpt.save(1, state_at(1), {})
    with pytest.raises(checkpoints.CheckpointWriteError, match='checkpoint step 1 could not be written'):
        ckpt.wait()
    ckpt.close()


def test_fingerprint_depends_on_names_dtypes_shapes_and_bytes_not_on_containers():
    a = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}}
    fp = workdir_lib.fingerprint(a)
    assert fp == workdir_lib.fingerprint({'params': {'w': jnp.arange(6.0).reshape(2, 3)}})
    assert fp == checkpoints.fingerprint(a)
    for other in (
        {'params': {'v': a['params']['w']}},
        {'params': {'w': a['params']['w'].astype(np.float64)}},
        {'params': {'w': a['params']['w'].reshape(3, 2)}},
        {'params': {'w': np.nextafter(a['params']['w'], np.float32(9))}},  # one ulp up
    ):
        assert workdir_lib.fingerprint(other) != fp


def identity(sha='aa', pixels='p'):
    return {'pretrained_sha256': sha, 'data': {'dataset': 'fashion_mnist', 'train_examples': 512,
                                               'train_sha256': pixels}}


def test_config_json_pins_the_inputs_by_content(tmp_path):
    workdir = str(tmp_path / 'w')
    try:
        checkpoints.check_or_write_config(workdir, {'lr': 0.1}, identity())
        checkpoints.check_or_write_config(workdir, {'lr': 0.1}, identity())  # same: accepted
        with pytest.raises(checkpoints.ConfigMismatchError, match='pretrained weights changed'):
            checkpoints.check_or_write_config(workdir, {'lr': 0.1}, identity(sha='bb'))
        with pytest.raises(checkpoints.ConfigMismatchError, match='data changed'):
            checkpoints.check_or_write_config(workdir, {'lr': 0.1}, identity(pixels='q'))
        with pytest.raises(checkpoints.ConfigMismatchError, match='different config'):
            checkpoints.check_or_write_config(workdir, {'lr': 0.2}, identity())
    finally:
        workdir_lib.release(workdir)
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['_identity'] == identity()


HOLD = (
    'import sys, time\nfrom ljax import workdir\nworkdir.lock(sys.argv[1])\n'
    'print("held", flush=True)\ntime.sleep(60)\n'
)


def test_lock_refuses_a_second_process_and_names_the_holder(tmp_path):
    workdir = str(tmp_path / 'w')
    env = {**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(__file__))}
    holder = subprocess.Popen(
        [sys.executable, '-c', HOLD, workdir], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == 'held'
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f'pid {holder.pid}'):
            workdir_lib.check_free(workdir)  # the same refusal up front
        with pytest.raises(workdir_lib.WorkdirLockedError, match=f'pid {holder.pid}'):
            workdir_lib.lock(workdir)
    finally:
        holder.kill()
        holder.wait()
    # the killed holder's flock died with it: the lock file left behind does not block
    assert os.path.exists(os.path.join(workdir, '.lock'))
    workdir_lib.check_free(workdir)
    workdir_lib.lock(workdir)  # check_free held nothing
    workdir_lib.release(workdir)
    fresh = tmp_path / 'fresh'
    workdir_lib.check_free(str(fresh))
    assert not fresh.exists()


def test_check_usable_refuses_a_file_and_creates_nothing(tmp_path):
    path = tmp_path / 'f'
    path.write_text('x')
    with pytest.raises(workdir_lib.WorkdirError, match='is a file'):
        workdir_lib.check_usable(str(path))
    with pytest.raises(workdir_lib.WorkdirError, match='is a file'):
        workdir_lib.check_usable(str(path / 'sub'))
    workdir_lib.check_usable(str(tmp_path / 'new' / 'deeper'))
    assert not (tmp_path / 'new').exists()


def test_clean_temp_files_removes_only_killed_exports(tmp_path):
    names = ['.jackpot.npz.ab12.tmp', 'results.json.tmp', 'jackpot.npz', 'results.json', 'x.tmp']
    for n in names:
        (tmp_path / n).write_text('x')
    removed = workdir_lib.clean_temp_files(str(tmp_path))
    removed = sorted(os.path.basename(p) for p in removed)
    assert removed == ['.jackpot.npz.ab12.tmp', 'results.json.tmp']
    assert sorted(os.listdir(tmp_path)) == ['jackpot.npz', 'results.json', 'x.tmp']


def test_load_npz_is_one_line_for_empty_and_truncated_files(tmp_path):
    empty = tmp_path / 'empty.npz'
    empty.write_bytes(b'')
    with pytest.raises(ValueError, match='empty'):
        workdir_lib.load_npz(str(empty), 'evaluate')
    good = tmp_path / 'good.npz'
    np.savez(good, **{'params/w': np.ones(1000)})
    cut = tmp_path / 'cut.npz'
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(ValueError, match='truncated or corrupt') as e:
        workdir_lib.load_npz(str(cut), 'evaluate')
    assert '\n' not in str(e.value)
    assert workdir_lib.load_npz(str(good), 'evaluate')['params']['w'].shape == (1000,)


def test_fingerprint_survives_the_npz_cache_round_trip(tmp_path):
    """A converted .pth is cached as .npz: both must pin the same contents."""
    from ljax import convert

    variables = {
        'params': {'conv': {'kernel': np.random.default_rng(0).normal(size=(3, 3, 2, 4))}},
        'batch_stats': {'bn': {'mean': np.zeros(4, np.float32), 'var': np.ones(4, np.float32)}},
    }
    convert.save_variables_npz(variables, tmp_path / 'v.npz')
    again = convert.load_variables_npz(tmp_path / 'v.npz')
    assert workdir_lib.fingerprint(again) == workdir_lib.fingerprint(variables)
