"""Turns bad input into one line on stderr and a non-zero exit, for main.py.

Exit status: 0 done; 2 bad input (config, flags, workdir, files: nothing in the workdir was lost
or overwritten); 1 a fault of the surroundings during a run (disk full) after which rerunning the
same command resumes from the last checkpoint.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import sys

ERROR_EXIT = 2
FAULT_EXIT = 1
USAGE = """\
ljax: search a lottery jackpot (a mask over frozen pre-trained weights).

usage: python main.py --config configs/CONFIG.py [--config.FIELD=VALUE ...] [--workdir DIR]

  --config   an ml_collections config file (configs/*.py; its get_config() starts from
             ljax.config.base())
  --workdir  the run directory (default runs/<config file name>); rerunning the same command
             resumes there from the newest intact checkpoint

modes (--config.mode=...):
  search    find a jackpot of --config.pretrained; writes WORKDIR/jackpot.npz and results.json
  pretrain  dense training from scratch; writes WORKDIR/pretrained.npz
  evaluate  re-score WORKDIR/jackpot.npz (or --config.jackpot=PATH) on the test split

config fields (--config.FIELD=VALUE):
"""


def _fail(message: str, code: int = ERROR_EXIT) -> None:
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(code)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- flags


def print_help(path: str | None = None) -> None:
    """The usage and every field; with --config PATH, that file's values rather than the
    defaults."""
    from ljax import config as config_lib

    config = check_config_file(path) if path else None
    print(USAGE + config_lib.help_text(config, path or ''))


def parse_flags(argv: list[str]) -> list[str]:
    """absl `flags_parser` for app.run: --help, a checked config file, one line per flag error."""
    from absl import flags

    path = _config_argument(argv[1:])
    if any(a in ('-h', '--help', '-help', '--helpshort', '-?') for a in argv[1:]):
        print_help(path)
        sys.exit(0)
    if path:
        check_config_file(path)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = _first_line(e)
        if '--config' in text and 'must have a value other than None' in text:
            _fail('--config is required: python main.py --config configs/CONFIG.py (see --help)')
        _fail(f'{text} (see python main.py --help)')
    except (AttributeError, KeyError) as e:  # ml_collections: an unknown --config.field
        _fail(_unknown_field(e))
    except OSError as e:  # ml_collections met a config file it could not load
        _fail(f'config: cannot load {path} ({_first_line(e)})')


def _config_argument(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        for name in ('--config', '-config'):
            if a.startswith(name + '='):
                return a.split('=', 1)[1]
            if a == name and i + 1 < len(args):
                return args[i + 1]
    return None


def check_config_file(path: str):
    """The ConfigDict that `path` (`file.py` or ml_collections' `file.py:arg`) gives, or one line.

    Loads the file as ml_collections does (a module whose get_config() returns a ConfigDict).
    """
    import ml_collections

    name, arg = path, None
    if not os.path.exists(path) and ':' in path:
        name, arg = path.split(':', 1)
    if not os.path.isfile(name):
        _fail(f'config: cannot load {name} (no such file); configs live in configs/*.py')
    try:
        spec = importlib.util.spec_from_file_location('_ljax_config_under_check', name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except SyntaxError as e:
        _fail(f'config: cannot load {name} (SyntaxError: {e.msg}, line {e.lineno})')
    except Exception as e:  # a failing import, or any error while the module runs
        _fail(f'config: cannot load {name} ({type(e).__name__}: {_first_line(e)})')
    get_config = getattr(module, 'get_config', None)
    if not callable(get_config):
        _fail(f'config: {name} defines no get_config() function (see configs/fashion_mnist.py)')
    try:
        config = get_config(arg) if arg is not None else get_config()
    except Exception as e:
        _fail(f'config: {name}: get_config() failed ({type(e).__name__}: {_first_line(e)})')
    if not isinstance(config, ml_collections.ConfigDict):
        _fail(
            f'config: {name}: get_config() returned a {type(config).__name__}, not an '
            'ml_collections.ConfigDict; start from ljax.config.base()'
        )
    return config


def _unknown_field(e: BaseException) -> str:
    text = str(e)
    hint = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text)
    if hint:
        return (
            f'unknown config field {hint[2]!r}: did you mean {hint[1]!r}? '
            '(every field is listed in python main.py --help)'
        )
    name = re.sub(r'[\\\'"]|\\n.*', '', text.split('\n')[0].split('\\n')[0])
    return f'unknown config field {name!r} (every field is listed in python main.py --help)'


def load_config_or_explain(config_flag, path: str):
    """The parsed config; a load failure ml_collections deferred to first access is one line."""
    try:
        config = config_flag.value
        config.mode  # ml_collections defers a load failure to the first attribute access
    except OSError as e:
        _fail(f'config: cannot load {path} ({_first_line(e)})')
    except AttributeError as e:
        _fail(_unknown_field(e))
    return config


# ----------------------------------------------------------------------------- the run


def quiet_background_noise(argv: list[str]) -> None:
    """Keep a failed run's stderr to our one line.

    orbax logs each failure of its background save threads at ERROR level before the same error
    reaches us (pass --verbosity=-2 to see those logs), and when a tensorstore read or write fails
    its completion callback may find orbax's event loop already closed and print
    'RuntimeError: Event loop is closed' through sys.excepthook: only that message is dropped.
    """
    from absl import logging

    if not any(a.startswith(('--verbosity', '-v=', '--v=')) for a in argv):
        logging.set_verbosity(logging.FATAL)
    previous_unraisable = sys.unraisablehook

    def unraisable(info):  # tensorstore reports a failing callback as an unraisable exception
        if info.exc_type is RuntimeError and str(info.exc_value) == 'Event loop is closed':
            return
        previous_unraisable(info)

    sys.unraisablehook = unraisable


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def run_or_explain(config, workdir: str) -> int:
    """train.run(config, workdir); bad input and faults of the surroundings end in one line."""
    from ljax import checkpoints, data, train, workdir as workdir_lib

    try:
        train.run(config, workdir)
    except (
        ValueError,
        FileNotFoundError,
        data.DatasetNotFoundError,
        data.MissingDataDependencyError,  # TensorFlow / TFDS not installed: names the pip command
        checkpoints.ConfigMismatchError,
        workdir_lib.WorkdirError,
    ) as e:
        if _is_disk_full(e):
            _fail(_disk_full(workdir), FAULT_EXIT)
        _fail(_first_line(e))
    except OSError as e:
        if _is_disk_full(e):
            _fail(_disk_full(workdir), FAULT_EXIT)
        if e.errno in _ENVIRONMENT_ERRNOS:
            _fail(f'{e.filename or workdir}: {e.strerror}; check the workdir and rerun', FAULT_EXIT)
        raise
    except Exception as e:  # orbax wraps a failed async write in its own errors
        if _is_disk_full(e):
            _fail(_disk_full(workdir), FAULT_EXIT)
        raise
    return 0


def _is_disk_full(e: BaseException) -> bool:
    while e is not None:
        if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if 'No space left on device' in str(e) or 'RESOURCE_EXHAUSTED' in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _disk_full(workdir: str) -> str:
    return (
        f'no space left on the device of workdir {workdir}; free some space and rerun the same '
        'command: it resumes from the newest intact checkpoint'
    )
