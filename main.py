"""ljax command line:
python main.py --config configs/fashion_mnist.py [--config.sparsity=0.95] [--workdir DIR]

Rerunning the same command resumes from the workdir's newest intact checkpoint.
`python main.py --help` lists the modes and every config field.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow (tf.data) start-up chatter

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'ml_collections config file (configs/*.py)', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory; default runs/<config file name>')
flags.mark_flag_as_required('config')


def main(argv):
    from ljax import cli

    cli.quiet_background_noise(sys.argv)  # orbax and tfds log a lot; we print our own lines
    if len(argv) > 1:
        cli._fail(f'unexpected arguments {argv[1:]} (see python main.py --help)')
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    config = cli.load_config_or_explain(_CONFIG, path)
    workdir = _WORKDIR.value or os.path.join('runs', os.path.splitext(os.path.basename(path))[0])
    sys.exit(cli.run_or_explain(config, workdir))


if __name__ == '__main__':
    from ljax.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
