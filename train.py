"""Train DeepSeek-V2 (JAX/Flax). With no flags, the default job: a small byte-level model on
the Python standard library's own sources, about 7 minutes on a 2-core CPU.

    python train.py                                         # configs/default.py -> runs/default
    python train.py --config configs/tiny.py --config.train.steps=200
    python train.py --config configs/small.py --config.data.source=arrayrecord \
        --config.data.path=data/packed                      # see deepseek_jax.data.prepare
    python -m deepseek_jax.train.plot runs/default          # loss curves, expert load
    python train.py --config configs/sft.py                 # SFT on chat data (mode "sft")
    python train.py --config configs/grpo.py                # GRPO from an SFT run ("grpo")

Any config field can be overridden with --config.<section>.<field>=value; an unknown or
mistyped field fails before any work starts. Running again resumes from the last checkpoint.

Many devices: --config.mesh.{data,fsdp,expert,tensor}. Many hosts: run the same command on
every host with --distributed (TPU pod slices, SLURM, Open MPI: JAX finds the rest), or with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. README "Scaling out".
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from deepseek_jax import errors
from deepseek_jax.parallel.mesh import start_processes
from deepseek_jax.rl import grpo, sft
from deepseek_jax.train import loop

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT, lock_config=True)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "one process of a multi-host job: jax.distributed.initialize()"
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 (implies --distributed)"
)
_PROCESSES = flags.DEFINE_integer("num_processes", None, "processes in the job")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. N - 1")
flags.DEFINE_bool("debug", False, "show the traceback of an error (errors.report_errors reads it)")


@errors.report_errors("train.py")
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.<field>=<value>")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if _DISTRIBUTED.value or _COORDINATOR.value:
        start_processes(_COORDINATOR.value, _PROCESSES.value, _PROCESS_ID.value)
    config = _CONFIG.value
    runs = {"pretrain": loop.run, "sft": sft.run, "grpo": grpo.run}
    if config.mode not in runs:
        raise app.UsageError(f"config.mode={config.mode!r}: choose one of {sorted(runs)}")
    runs[config.mode](config)


if __name__ == "__main__":
    app.run(main)
