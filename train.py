"""Train DeepSeek-V2 (JAX/Flax). With no flags, the default job: a small byte-level model on
the Python standard library's own sources, under 10 minutes on a 2-core CPU.

    python train.py                                         # configs/default.py -> runs/default
    python train.py --config configs/tiny.py --config.train.steps=200
    python train.py --config configs/small.py --config.data.source=arrayrecord \
        --config.data.path=data/packed                      # see deepseek_jax.data.prepare
    python -m deepseek_jax.train.plot runs/default          # loss curves, expert load

Any config field can be overridden with --config.<section>.<field>=value; an unknown or
mistyped field fails before any work starts. Running again resumes from the last checkpoint.
"""

import os

from absl import app, logging
from ml_collections import config_flags

from deepseek_jax.train.loop import run

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT, lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.<field>=<value>")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    run(_CONFIG.value)


if __name__ == "__main__":
    app.run(main)
