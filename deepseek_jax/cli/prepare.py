r"""deepseek-jax-prepare (= python -m deepseek_jax.cli.prepare): tokenize and pack a text source
once into ArrayRecord files, for training at any size (deepseek_jax/data/prepare.py).

    deepseek-jax-prepare --config tiny --config.data.source=jsonl \
        --config.data.path='data/*.jsonl' --out data/packed
    deepseek-jax-train --config tiny --config.data.source=arrayrecord \
        --config.data.path=data/packed
"""

from __future__ import annotations

from deepseek_jax import configs
from deepseek_jax.cli import args as cli_args
from deepseek_jax.cli.parser import Parser
from deepseek_jax.errors import report_errors

PROG = "deepseek-jax-prepare"


@report_errors(PROG)
def main(argv: list[str] | None = None) -> None:
    p = Parser(PROG, __doc__)
    cli_args.add_config_flags(p)
    p.add_argument("--out", required=True, help="output folder")
    args, config = cli_args.parse(p, argv, with_config=True)
    if args.print_config:
        cli_args.print_config(config)
        return
    data = configs.from_config_dict(config).data
    from deepseek_jax.data.prepare import prepare  # noqa: PLC0415  (after the checks: slow)

    meta = prepare(data, args.out)
    print(f"wrote {meta['rows']} rows of {meta['seq_len'] + 1} tokens to {args.out}")


if __name__ == "__main__":
    main()
