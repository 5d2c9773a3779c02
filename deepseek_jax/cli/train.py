r"""deepseek-jax-train (= python -m deepseek_jax.cli.train = python train.py): train DeepSeek-V2.

With no flags, the default job: a small byte-level model on the Python standard library's own
sources, about 9 minutes on a 2-core CPU.

    deepseek-jax-train                                     # config "default" -> runs/default
    deepseek-jax-train --config tiny --config.train.steps=200
    deepseek-jax-train --config small --config.data.source=arrayrecord \
        --config.data.path=data/packed                     # see deepseek-jax-prepare
    deepseek-jax-train --config sft                        # SFT on chat data (mode "sft")
    deepseek-jax-train --config grpo                       # GRPO from an SFT run ("grpo")
    deepseek-jax-train --config my_experiment.py --print_config

Any config field can be overridden with --config.<section>.<field>=value; an unknown or
mistyped field fails before any work starts. Running again resumes from the last checkpoint.

Many devices: --config.mesh.{data,fsdp,expert,tensor}. Many hosts: run the same command on
every host with --distributed (TPU pod slices, SLURM, Open MPI: JAX finds the rest), or give
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (each implies --distributed).
"""

from __future__ import annotations

from deepseek_jax import configs
from deepseek_jax.cli import args as cli_args
from deepseek_jax.cli.parser import Parser
from deepseek_jax.errors import UserError, report_errors

PROG = "deepseek-jax-train"


def parser() -> Parser:
    p = Parser(PROG, __doc__)
    cli_args.add_config_flags(p)
    p.add_argument(
        "--distributed",
        action="store_true",
        help="one process of a multi-host job: jax.distributed.initialize()",
    )
    p.add_argument("--coordinator_address", help="HOST:PORT of process 0 (implies --distributed)")
    p.add_argument("--num_processes", type=int, help="processes in the job (implies --distributed)")
    p.add_argument("--process_id", type=int, help="this process's index, 0 .. N - 1 (implies it)")
    return p


def distributed(args) -> bool:
    """Whether this is one process of many; the values it is given must agree."""
    n, i = args.num_processes, args.process_id
    if n is not None and n < 1:
        raise UserError(f"--num_processes={n}: must be at least 1")
    if i is not None and not 0 <= i < (n if n is not None else i + 1):
        raise UserError(f"--process_id={i}: must lie in 0 .. --num_processes - 1 ({n} - 1)")
    given = args.coordinator_address or n is not None or i is not None
    return bool(args.distributed or given)


@report_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    args, config = cli_args.parse(parser(), argv, with_config=True)
    if args.print_config:
        cli_args.print_config(config)
        return
    run = configs.from_config_dict(config)  # typed and checked before anything is compiled or read
    multi = distributed(args)
    # orbax and the loops load in seconds: after the checks, so a mistake answers sooner.
    from absl import logging  # noqa: PLC0415

    from deepseek_jax.parallel.mesh import start_processes  # noqa: PLC0415
    from deepseek_jax.rl import grpo, sft  # noqa: PLC0415
    from deepseek_jax.train import loop  # noqa: PLC0415

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if multi:
        start_processes(args.coordinator_address, args.num_processes, args.process_id)
    runs = {"pretrain": loop.run, "sft": sft.run, "grpo": grpo.run}
    runs[run.mode](run)


if __name__ == "__main__":
    main()
