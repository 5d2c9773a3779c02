"""Converts a checkpoint between the HF/PyTorch format and ours (orbax), either way.

    deepseek-jax-convert --from hf --to orbax DeepSeek-V2-Lite lite_orbax
    deepseek-jax-convert lite_orbax lite_hf --dtype bfloat16
    deepseek-jax-convert deepseek-ai/DeepSeek-V2-Lite-Chat lite --mesh expert=8

(= python -m deepseek_jax.checkpoint.convert; flags as every command's, cli/parser.py).

The source is a directory or a hub id. Without --from, a source holding a config.json is HF
and anything else orbax; without --to, the target is the other format. --dtype sets the
params' dtype (default: the source's own). Both ways stream: the params are read straight
onto the devices of --mesh (default: one device) and written from there, the HF side one
tensor at a time; no host copy of the whole model is made.
Tokenizer files, chat template and generation_config.json travel with the weights.
"""

from __future__ import annotations

import os

from deepseek_jax.checkpoint import is_hf_dir, load_checkpoint, split_step
from deepseek_jax.checkpoint.hf import NP_DTYPES, save_hf
from deepseek_jax.checkpoint.hub import local_dir
from deepseek_jax.cli.parser import Parser
from deepseek_jax.errors import UserError, report_errors
from deepseek_jax.parallel.mesh import make_mesh, parse_mesh

FORMATS = ("hf", "orbax")


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    from_format: str | None = None,
    to_format: str | None = None,
    dtype: str | None = None,
    mesh=None,
) -> tuple[str, str]:
    """Reads `source` and writes it to `target`; returns the (from, to) formats used."""
    path, step = split_step(source)
    directory = local_dir(path)
    target = os.fspath(target)
    if dtype is not None and dtype not in NP_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {sorted(NP_DTYPES)}")
    detected = "hf" if is_hf_dir(directory) else "orbax"
    from_format = from_format or detected
    to_format = to_format or ("orbax" if from_format == "hf" else "hf")
    for name, fmt in (("--from", from_format), ("--to", to_format)):
        if fmt not in FORMATS:
            raise UserError(f"{name} {fmt!r}: choose one of {FORMATS}")
    if from_format != detected:
        raise UserError(f"--from {from_format}: {source} is an {detected} checkpoint")
    source_dir = directory if step is None else f"{directory}:{step}"
    cfg, params = load_checkpoint(source_dir, dtype=dtype, mesh=mesh)
    if to_format == "hf":
        save_hf(target, cfg, params, tokenizer=directory)
    else:
        from deepseek_jax.checkpoint.orbax import save_params  # noqa: PLC0415  (slow import)

        has_tokenizer = os.path.exists(os.path.join(directory, "tokenizer.json"))
        save_params(target, cfg, params, directory if has_tokenizer else "byte")
    return from_format, to_format


def mesh_from_flag(flag: str | None):
    if not flag:
        return None
    try:
        return make_mesh(**parse_mesh(flag))
    except ValueError as e:
        raise UserError(str(e)) from None


@report_errors("deepseek-jax-convert")
def main(argv: list[str] | None = None) -> None:
    parser = Parser("deepseek-jax-convert", __doc__)
    parser.add_argument("source", help="HF dir, hub id (owner/name) or run dir[:step]")
    parser.add_argument("target")
    parser.add_argument("--from", dest="from_format", choices=FORMATS)
    parser.add_argument("--to", dest="to_format", choices=FORMATS)
    parser.add_argument("--dtype", choices=sorted(NP_DTYPES))
    parser.add_argument("--mesh", help="e.g. expert=8 or fsdp=4,expert=2 (default: one device)")
    args = parser.parse_args(argv)
    mesh = mesh_from_flag(args.mesh)
    used = convert(args.source, args.target, args.from_format, args.to_format, args.dtype, mesh)
    print(f"{args.source} ({used[0]}) -> {args.target} ({used[1]})")


if __name__ == "__main__":
    main()
