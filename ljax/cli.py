"""Turns bad input into one line on stderr and a non-zero exit, for main.py and `python -m ljax`."""

import contextlib
import re
import sys

ERROR_EXIT = 2


def _fail(message: str) -> None:
    print(f'error: {message}', file=sys.stderr, flush=True)
    sys.exit(ERROR_EXIT)


def run_or_explain(config, workdir: str) -> int:
    from ljax import checkpoints, data, train

    try:
        train.run(config, workdir)
    except (
        ValueError,
        FileNotFoundError,
        data.DatasetNotFoundError,
        checkpoints.ConfigMismatchError,
    ) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    return 0


def load_config_or_explain(config_flag, path: str):
    """The parsed config; a file that is missing or fails to import is one line."""
    config = config_flag.value
    try:
        config.mode  # ml_collections defers a load failure to the first attribute access
    except OSError as e:
        _fail(f'config: {_load_failure(e)}')
    return config


def _load_failure(e: OSError) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    files = [l for l in lines if l.endswith('.py')]
    reason = lines[-1] if lines else type(e).__name__
    return f'cannot load {files[0] if files else "the config file"} ({reason})'


@contextlib.contextmanager
def explain_flag_errors():
    """ml_collections raises a bare AttributeError (with a traceback) for an unknown --config.field."""
    try:
        yield
    except AttributeError as e:
        text = str(e)
        hint = re.search(r'Did you mean "([\w.]+)" instead of "([\w.]+)"', text)
        if hint:
            _fail(
                f'unknown config field {hint[2]!r}: did you mean {hint[1]!r}? '
                '(every field is listed in ljax/config.py)'
            )
        name = re.sub(r'[\\\'"]|\\n.*', '', text.split('\n')[0].split('\\n')[0])
        _fail(f'unknown config field {name!r} (every field is listed in ljax/config.py)')
    except (
        OSError
    ) as e:  # a config file that is missing or fails to import, met while parsing overrides
        _fail(f'config: {_load_failure(e)}')
