"""Fault table: runs `main.py` under bad input and faults of its surroundings, prints what happened.

python benchmarks/faults.py            # every fault (a few minutes on 2 cores)
python benchmarks/faults.py --fast     # only the bad-input rows that stop before any search

Each fault is a function `(Lab) -> Row` that provokes the fault, runs the command a user would run,
and checks the outcome it promises (`Row.ok`); tests/test_faults.py runs the same functions. Runs
are tiny (512 training examples, 1 epoch of 4 steps, the shipped Fashion-MNIST model).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = (
    '--config=configs/fashion_mnist.py',
    '--config.train_examples=512',
    '--config.eval_examples=500',
    '--config.epochs=1',
    '--config.batch_size=128',
    '--config.progress=False',
    '--config.checkpoint_every_steps=1',
    '--config.max_to_keep=3',
)
STEPS = 4  # 512 examples / batch 128, one epoch: checkpoints at steps 2, 3, 4 are kept


@dataclasses.dataclass
class Row:
    fault: str
    command: str
    code: int | None
    message: str
    outcome: str
    ok: bool


FAULTS: list[tuple[str, bool, object]] = []  # (name, fast, fn)


def fault(name: str, fast: bool = False):
    def register(fn):
        FAULTS.append((name, fast, fn))
        return fn

    return register


class Lab:
    """Temporary directories, the command runner and a shared finished reference run."""

    def __init__(self, root: str | None = None):
        self.root = root or tempfile.mkdtemp(prefix='ljax-faults-')
        self._reference = None
        self._n = 0

    def path(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.root, f'{self._n:02d}-{name}')

    def command(self, workdir: str | None, *extra: str, quick: bool = True) -> list[str]:
        args = [sys.executable, 'main.py', *(QUICK if quick else ()), *extra]
        return args + ([f'--workdir={workdir}'] if workdir else [])

    def run(self, workdir, *extra, env=None, quick=True, timeout=600):
        return subprocess.run(
            self.command(workdir, *extra, quick=quick),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def popen(self, workdir, *extra):
        return subprocess.Popen(
            self.command(workdir, *extra),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def shown(self, workdir, *extra, quick=True) -> str:
        """The command as a user types it, tmp paths shortened to $W / $TMP."""
        text = ' '.join(
            ['python main.py', '$QUICK' if quick else '', *extra]
            + ([f'--workdir={workdir}'] if workdir else [])
        )
        text = text.replace('  ', ' ')
        if workdir:
            text = text.replace(workdir, '$W')
        return text.replace(self.root, '$TMP')

    def reference(self) -> str:
        """A finished run (checkpoints at steps 2..4), its jackpot.npz saved as reference.npz."""
        if self._reference is None:
            workdir = self.path('reference')
            proc = self.run(workdir)
            if proc.returncode != 0:
                raise RuntimeError(f'reference run failed: {proc.stderr[-2000:]}')
            shutil.copy(os.path.join(workdir, 'jackpot.npz'), workdir + '.reference.npz')
            self._reference = workdir
        return self._reference

    def copy_of_reference(self, name: str) -> str:
        workdir = self.path(name)
        shutil.copytree(self.reference(), workdir)
        return workdir

    def same_mask_as_reference(self, workdir: str) -> bool:
        return _masks(workdir + '/jackpot.npz') == _masks(self.reference() + '.reference.npz')


def _masks(path):
    with np.load(path) as z:
        return {k: z[k].tobytes() for k in z.files if k.startswith('mask/')}


def error_line(proc) -> tuple[bool, str]:
    """(stderr is exactly one 'error: ' line and no traceback, that line; else the first lines
    of stderr joined by ' | ', so that a failing row shows what else was printed)."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    one = len(lines) == 1 and lines[0].startswith('error: ') and 'Traceback' not in proc.stderr
    return one, (lines[-1] if one or len(lines) < 2 else ' | '.join(lines)[:600])


def _line(text: str, needle: str) -> str:
    return next((l for l in text.splitlines() if needle in l), '')


def refused(lab, name, workdir, extra, expect, *, env=None, quick=True):
    """A bad-input row: exit 2, one error line containing `expect`, workdir untouched."""
    before = _snapshot(workdir)
    proc = lab.run(workdir, *extra, env=env, quick=quick)
    one, line = error_line(proc)
    untouched = _snapshot(workdir) == before  # absent stays absent, present keeps every file
    ok = proc.returncode == 2 and one and expect in line and untouched
    outcome = 'refused, workdir untouched' if untouched else 'WORKDIR CHANGED'
    if not one:
        outcome += '; NOT ONE LINE'
    return Row(name, lab.shown(workdir, *extra, quick=quick), proc.returncode, line, outcome, ok)


def _snapshot(workdir):
    """{relative path: (size, mtime_ns)} of everything under workdir but .lock; None when absent.

    .lock is the run lock: taking it records the pid of the run that holds it.
    """
    if workdir is None or not os.path.exists(workdir):
        return None
    if os.path.isfile(workdir):
        st = os.stat(workdir)
        return {'.': (st.st_size, st.st_mtime_ns)}
    out = {}
    for d, _, files in os.walk(workdir):
        for f in files:
            if d == workdir and f == '.lock':
                continue
            st = os.stat(os.path.join(d, f))
            out[os.path.relpath(os.path.join(d, f), workdir)] = (st.st_size, st.st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- bad config files


def _config_file(lab, name, text):
    path = lab.path(name) + '.py'
    with open(path, 'w') as f:
        f.write(text)
    return path


@fault('config file with a syntax error', fast=True)
def config_syntax(lab):
    cfg = _config_file(lab, 'syntax', 'def get_config(:\n')
    return refused(lab, 'config file with a syntax error', lab.path('w'), [f'--config={cfg}'],
                   'SyntaxError', quick=False)


@fault('config file whose import fails', fast=True)
def config_import(lab):
    cfg = _config_file(lab, 'import', 'import no_such_module\n')
    return refused(lab, 'config file whose import fails', lab.path('w'), [f'--config={cfg}'],
                   "No module named 'no_such_module'", quick=False)


@fault('config file without get_config', fast=True)
def config_no_get_config(lab):
    cfg = _config_file(lab, 'noget', 'X = 1\n')
    return refused(lab, 'config file without get_config', lab.path('w'), [f'--config={cfg}'],
                   'defines no get_config()', quick=False)


@fault('get_config returns a dict', fast=True)
def config_returns_dict(lab):
    cfg = _config_file(lab, 'dict', 'def get_config():\n    return {"lr": 0.1}\n')
    return refused(lab, 'get_config returns a dict', lab.path('w'), [f'--config={cfg}'],
                   'not an ml_collections.ConfigDict', quick=False)


# ----------------------------------------------------------------------------- bad values


@fault('non-numeric flag value', fast=True)
def flag_not_a_number(lab):
    return refused(lab, 'non-numeric flag value', lab.path('w'), ['--config.sparsity=abc'],
                   "could not convert string to float: 'abc'")


@fault('misspelt config field', fast=True)
def flag_unknown_field(lab):
    return refused(lab, 'misspelt config field', lab.path('w'), ['--config.sparsty=0.5'],
                   "did you mean 'sparsity'")


@fault('out-of-range values (all listed)', fast=True)
def bad_values(lab):
    extra = ['--config.lr=-1', '--config.train_examples=-5', '--config.score_margin=-1',
             '--config.max_to_keep=0', '--config.checkpoint_every_steps=0',
             '--config.log_every_steps=0', '--config.momentum=1.0', '--config.restriction=cosin']
    row = refused(lab, 'out-of-range values (all listed)', lab.path('w'), extra, 'config: ')
    names = ('lr', 'train_examples', 'score_margin', 'max_to_keep', 'checkpoint_every_steps',
             'log_every_steps', 'momentum', 'restriction')
    row.ok = row.ok and all(f'{n}: expected' in row.message for n in names)
    row.message = row.message[:150] + ' ...'
    return row


@fault('sparsity that empties every layer', fast=True)
def sparsity_empties_layers(lab):
    return refused(lab, 'sparsity that empties every layer', lab.path('w'),
                   ['--config.sparsity=0.999999'], 'keeps no weight in')


# ----------------------------------------------------------------------------- workdirs


@fault('workdir is a file', fast=True)
def workdir_is_file(lab):
    path = lab.path('file')
    with open(path, 'w') as f:
        f.write('not a directory\n')
    return refused(lab, 'workdir is a file', path, [], 'is a file, not a directory')


@fault('workdir on a read-only file system (rerun of a finished job)', fast=True)
def workdir_read_only(lab):
    name = 'workdir on a read-only file system (rerun of a finished job)'
    workdir = lab.path('readonly')
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
        f.write('{}\n')
    how = _make_read_only(workdir)
    try:
        row = refused(lab, name, workdir, [], 'read-only file system' if how == 'mount' else
                      'not writable')
        row.outcome += f' ({"read-only tmpfs mount" if how == "mount" else "chmod 0555"})'
        return row
    finally:
        _undo_read_only(workdir, how)


def _make_read_only(workdir):
    if os.geteuid() != 0:  # permissions bind everyone but root
        os.chmod(workdir, 0o555)
        return 'chmod'
    tmp = workdir + '.content'
    shutil.copytree(workdir, tmp)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', workdir], check=True)
    shutil.copytree(tmp, workdir, dirs_exist_ok=True)
    subprocess.run(['mount', '-o', 'remount,ro', workdir], check=True)
    return 'mount'


def _undo_read_only(workdir, how):
    if how == 'chmod':
        os.chmod(workdir, 0o755)
    else:
        subprocess.run(['umount', workdir], check=False)


@fault('workdir locked by a live run', fast=True)
def workdir_locked(lab):
    workdir = lab.path('locked')
    os.makedirs(workdir)
    holder = subprocess.Popen(  # a stand-in process that holds the lock as a run does
        [sys.executable, '-c', 'import fcntl, os, sys, time\n'
         'fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n'
         'fcntl.flock(fd, fcntl.LOCK_EX)\nos.write(fd, f"{os.getpid()}\\n".encode())\n'
         'print("locked", flush=True)\ntime.sleep(600)\n', os.path.join(workdir, '.lock')],
        stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        row = refused(lab, 'workdir locked by a live run', workdir, [], f'pid {holder.pid}')
    finally:
        holder.kill()
        holder.wait()
    return row


# ----------------------------------------------------------------------------- exported files


@fault('evaluate an empty jackpot.npz', fast=True)
def evaluate_empty(lab):
    path = lab.path('empty.npz')
    open(path, 'wb').close()
    return refused(lab, 'evaluate an empty jackpot.npz', lab.path('w'),
                   ['--config.mode=evaluate', f'--config.jackpot={path}'], 'the file is empty')


@fault('evaluate a truncated jackpot.npz', fast=True)
def evaluate_truncated(lab):
    path = lab.path('truncated.npz')
    with open(os.path.join(ROOT, 'pretrained', 'fashion_mnist_mlp.npz'), 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[: len(data) // 2])
    return refused(lab, 'evaluate a truncated jackpot.npz', lab.path('w'),
                   ['--config.mode=evaluate', f'--config.jackpot={path}'], 'truncated or corrupt')


# ----------------------------------------------------------------------------- changed inputs


@fault('same pretrained path, other contents')
def pretrained_changed(lab):
    workdir = lab.path('pretrained')
    weights = workdir + '.npz'
    shutil.copy(os.path.join(ROOT, 'pretrained', 'fashion_mnist_mlp.npz'), weights)
    first = lab.run(workdir, f'--config.pretrained={weights}')
    with np.load(weights) as z:
        arrays = {k: z[k] for k in z.files}
    key = sorted(k for k in arrays if k.endswith('kernel'))[0]
    arrays[key] = arrays[key] * np.float32(1.001)
    np.savez(weights, **arrays)
    row = refused(lab, 'same pretrained path, other contents', workdir,
                  [f'--config.pretrained={weights}'], 'the pretrained weights changed')
    row.ok = row.ok and first.returncode == 0
    return row


@fault('same config, other data')
def data_changed(lab):
    workdir = lab.path('data')
    directory = workdir + '.fashion'
    rng = np.random.default_rng(0)
    _write_fashion(directory, rng, n_train=600, n_test=500)
    env = {'LJAX_FASHION_MNIST_DIR': directory}
    first = lab.run(workdir, env=env)
    _write_fashion(directory, rng, n_train=600, n_test=500)  # same sizes, other pixels
    row = refused(lab, 'same config, other data', workdir, [], 'the data changed', env=env)
    row.command = 'LJAX_FASHION_MNIST_DIR=$DATA ' + row.command
    row.ok = row.ok and first.returncode == 0
    return row


def _write_fashion(directory, rng, *, n_train, n_test):
    os.makedirs(directory, exist_ok=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        for kind, array, magic in (('images-idx3', images, 3), ('labels-idx1', labels, 1)):
            header = bytes([0, 0, 8, magic]) + np.asarray(array.shape, '>u4').tobytes()
            with gzip.open(os.path.join(directory, f'{prefix}-{kind}-ubyte.gz'), 'wb') as f:
                f.write(header + array.tobytes())


# ----------------------------------------------------------------------------- checkpoints


def _latest_data_file(workdir):
    step_dir = os.path.join(workdir, 'checkpoints', str(STEPS), 'state')
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
             if os.sep + 'd' + os.sep in os.path.join(d, f)]
    return max(files, key=os.path.getsize)


def _resume_after(lab, name, damage):
    workdir = lab.copy_of_reference(name.split()[0])
    for f in ('jackpot.npz', 'results.json'):
        os.remove(os.path.join(workdir, f))
    what = damage(workdir)
    proc = lab.run(workdir)
    moved = os.listdir(os.path.join(workdir, 'checkpoints', 'corrupt'))
    resumed = _line(proc.stdout, 'resumed from step')
    same = proc.returncode == 0 and lab.same_mask_as_reference(workdir)
    ok = same and resumed == f'resumed from step {STEPS - 1} ({workdir})' and len(moved) == 1
    outcome = (f'{what}; resumed from step {STEPS - 1}, step {STEPS} moved to corrupt/, '
               f'final mask {"==" if same else "!="} uninterrupted run')
    message = _line(proc.stderr, 'unusable')
    return Row(name, lab.shown(workdir) + '  (rerun)', proc.returncode, message, outcome, ok)


@fault('truncated file in the latest checkpoint')
def checkpoint_truncated(lab):
    def damage(workdir):
        path = _latest_data_file(workdir)
        size = os.path.getsize(path)
        with open(path, 'r+b') as f:
            f.truncate(size // 2)
        return f'{os.path.basename(path)[:8]}.. cut to {size // 2} of {size} bytes'

    return _resume_after(lab, 'truncated file in the latest checkpoint', damage)


@fault('flipped bytes in the latest checkpoint')
def checkpoint_flipped(lab):
    def damage(workdir):
        path = _latest_data_file(workdir)
        with open(path, 'r+b') as f:
            data = bytearray(f.read())
            for i in range(len(data) // 3, len(data) // 3 + 8):
                data[i] ^= 0xFF
            f.seek(0)
            f.write(data)
        return f'8 bytes flipped in {os.path.basename(path)[:8]}..'

    return _resume_after(lab, 'flipped bytes in the latest checkpoint', damage)


@fault('every checkpoint corrupt')
def checkpoint_all_corrupt(lab):
    name = 'every checkpoint corrupt'
    workdir = lab.copy_of_reference('allcorrupt')
    for f in ('jackpot.npz', 'results.json'):
        os.remove(os.path.join(workdir, f))
    ckpt = os.path.join(workdir, 'checkpoints')
    for step in os.listdir(ckpt):
        with open(os.path.join(ckpt, step, 'meta', 'metadata'), 'w') as f:
            f.write('{"not": "json"')
    proc = lab.run(workdir)
    moved = os.listdir(os.path.join(ckpt, 'corrupt'))
    same = proc.returncode == 0 and lab.same_mask_as_reference(workdir)
    ok = same and len(moved) == 3 and 'starting over from step 0' in proc.stderr
    outcome = (f'{len(moved)} steps moved to corrupt/, started over; final mask '
               f'{"==" if same else "!="} uninterrupted run')
    return Row(name, lab.shown(workdir) + '  (rerun)', proc.returncode,
               _line(proc.stderr, 'no intact checkpoint'), outcome, ok)


@fault('kill -9 during a save, then rerun')
def kill_during_save(lab):
    name = 'kill -9 during a save, then rerun'
    workdir = lab.path('killed')
    ckpt = os.path.join(workdir, 'checkpoints')
    proc = lab.popen(workdir)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # a finished step, and the next saving
        entries = os.listdir(ckpt) if os.path.isdir(ckpt) else []
        if any(e.isdigit() for e in entries) and any('tmp' in e for e in entries):
            break
        time.sleep(0.005)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rerun = lab.run(workdir)
    same = rerun.returncode == 0 and lab.same_mask_as_reference(workdir)
    ok = killed and same and 'resumed from step' in rerun.stdout
    outcome = (f'{"killed while a tmp step existed" if killed else "NOT KILLED IN TIME"}; '
               f'final mask {"==" if same else "!="} uninterrupted run')
    return Row(name, lab.shown(workdir) + '  (twice)', rerun.returncode,
               _line(rerun.stdout, 'resumed from step'), outcome, ok)


@fault('checkpoints/ deleted mid-run')
def checkpoints_deleted(lab):
    name = 'checkpoints/ deleted mid-run'
    workdir = lab.path('deleted')
    ckpt = os.path.join(workdir, 'checkpoints')
    proc = lab.popen(workdir)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(ckpt) and any(e.isdigit() for e in os.listdir(ckpt)):
            break
        time.sleep(0.01)
    deleted = proc.poll() is None
    os.rename(ckpt, ckpt + '.gone')  # gone at once, as `rm -rf` would leave it in the end
    shutil.rmtree(ckpt + '.gone', ignore_errors=True)
    out, err = proc.communicate(timeout=600)
    same = proc.returncode == 0 and lab.same_mask_as_reference(workdir)
    ok = deleted and same and 'Traceback' not in err
    outcome = (f'{"deleted after the first step" if deleted else "RUN ENDED FIRST"}; run went on, '
               f'final mask {"==" if same else "!="} uninterrupted run')
    message = _line(err, 'deleted during the run') or _line(err, 'error') or '(none)'
    return Row(name, lab.shown(workdir), proc.returncode, message, outcome, ok)


@fault('two runs on one workdir')
def two_runs(lab):
    name = 'two runs on one workdir'
    workdir = lab.path('two')
    first = lab.popen(workdir)
    deadline = time.time() + 300
    lock = os.path.join(workdir, '.lock')
    while time.time() < deadline and first.poll() is None:
        if os.path.exists(lock) and open(lock).read().strip():
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # hold the first run inside its lock while the second starts
    try:
        second = lab.run(workdir)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=600)
    one, line = error_line(second)
    same = first.returncode == 0 and lab.same_mask_as_reference(workdir)
    ok = second.returncode == 2 and one and f'pid {first.pid}' in line and same
    outcome = (f'second refused; first finished (exit {first.returncode}), final mask '
               f'{"==" if same else "!="} uninterrupted run' + ('' if one else '; NOT ONE LINE'))
    return Row(name, lab.shown(workdir) + '  (x2, concurrently)', second.returncode, line,
               outcome, ok)


@fault('stale .lock of a killed run')
def stale_lock(lab):
    name = 'stale .lock of a killed run'
    workdir = lab.copy_of_reference('stale')
    with open(os.path.join(workdir, '.lock'), 'w') as f:
        f.write('999999\n')  # a pid that holds nothing: flock died with its process
    tmp_files = [os.path.join(workdir, '.jackpot.npz.k1ll3d.tmp'),
                 os.path.join(workdir, 'results.json.tmp')]
    for path in tmp_files:
        with open(path, 'w') as f:
            f.write('half an export')
    proc = lab.run(workdir)
    cleaned = not any(os.path.exists(p) for p in tmp_files)
    same = proc.returncode == 0 and lab.same_mask_as_reference(workdir)
    ok = same and cleaned
    outcome = (f'ran; killed export tmp files {"removed" if cleaned else "LEFT"}; final mask '
               f'{"==" if same else "!="} uninterrupted run')
    return Row(name, lab.shown(workdir) + '  (rerun)', proc.returncode,
               _line(proc.stdout, 'resumed from step'), outcome, ok)


@fault('disk full (1 MiB tmpfs)')
def disk_full(lab):
    name = 'disk full (1 MiB tmpfs)'
    mount = lab.path('tmpfs')
    os.makedirs(mount)
    workdir = os.path.join(mount, 'w')
    got = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mount],
                         capture_output=True, text=True)
    if got.returncode != 0:
        return Row(name, f'mount -t tmpfs -o size=1m tmpfs $TMP', got.returncode,
                   (got.stderr.strip().splitlines() or [''])[0], 'NOT SIMULATED: mount refused',
                   False)
    try:
        proc = lab.run(workdir)
        one, line = error_line(proc)
        config_kept = os.path.isfile(os.path.join(workdir, 'config.json'))
        subprocess.run(['mount', '-o', 'remount,size=64m', mount], check=True)  # space freed
        rerun = lab.run(workdir)
        same = rerun.returncode == 0 and lab.same_mask_as_reference(workdir)
        ok = proc.returncode == 1 and one and 'no space left' in line and config_kept and same
        outcome = (f'config.json intact; after growing the tmpfs to 64 MiB the same command '
                   f'finished (exit {rerun.returncode}), final mask '
                   f'{"==" if same else "!="} uninterrupted run')
        return Row(name, lab.shown(workdir) + '  ($W on a 1 MiB tmpfs)', proc.returncode,
                   line or proc.stderr[-300:], outcome, ok)
    finally:
        subprocess.run(['umount', mount], check=False)


# ----------------------------------------------------------------------------- table


def table(rows: list[Row], root: str = '') -> str:
    lines = ['| fault | command | exit | message | outcome | ok |', '|---|---|---|---|---|---|']
    for r in rows:
        message = r.message.replace(root, '$TMP') if root else r.message
        cells = [r.fault, f'`{r.command}`', str(r.code), message.replace('|', '\\|'),
                 r.outcome, 'yes' if r.ok else 'NO']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--fast', action='store_true', help='only the rows that need no search')
    parser.add_argument('--only', default='', help='run the faults whose name contains this')
    args = parser.parse_args(argv)
    lab = Lab()
    rows = []
    for name, fast, fn in FAULTS:
        if (args.fast and not fast) or args.only not in name:
            continue
        t0 = time.time()
        row = fn(lab)
        rows.append(row)
        print(f'{"ok " if row.ok else "NO "} {name} ({time.time() - t0:.0f} s)', file=sys.stderr,
              flush=True)
    print(f'QUICK = {" ".join(QUICK)}\n')
    print(table(rows, lab.root))
    shutil.rmtree(lab.root, ignore_errors=True)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
