"""Converts a checkpoint between the HF/PyTorch format and ours (orbax), either way.

    deepseek-jax-convert --from hf --to orbax DeepSeek-V2-Lite lite_orbax
    deepseek-jax-convert lite_orbax lite_hf --dtype bfloat16

(= python -m deepseek_jax.checkpoint.convert; flags as every command's, cli/parser.py).

Without --from, a source holding a config.json is HF and anything else orbax; without --to,
the target is the other format. --dtype sets the params' dtype (default: the source's own).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from deepseek_jax import errors
from deepseek_jax.checkpoint import is_hf_dir
from deepseek_jax.checkpoint.hf import NP_DTYPES, load_hf, save_hf
from deepseek_jax.cli.parser import Parser
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError

FORMATS = ("hf", "orbax")


def load(path: str, fmt: str, dtype: str | None) -> tuple[ModelConfig, dict]:
    if fmt == "hf":
        return load_hf(path, dtype=dtype)
    from deepseek_jax.checkpoint.orbax import load_params  # noqa: PLC0415  (orbax is slow to import)

    cfg, params = load_params(path)
    if dtype is None or dtype == cfg.param_dtype:
        return cfg, params
    params = jax.tree.map(lambda x: x.astype(jnp.dtype(NP_DTYPES[dtype])), params)
    return cfg.replace(param_dtype=dtype, dtype=dtype), params


def save(path: str, fmt: str, cfg: ModelConfig, params: dict, tokenizer: str = "byte") -> None:
    """tokenizer: "byte" or a dir whose tokenizer files an orbax target keeps beside the params."""
    if fmt == "hf":
        save_hf(path, cfg, params)
        return
    from deepseek_jax.checkpoint.orbax import save_params  # noqa: PLC0415

    save_params(path, cfg, params, tokenizer)


def convert(
    source: str | os.PathLike,
    target: str | os.PathLike,
    from_format: str | None = None,
    to_format: str | None = None,
    dtype: str | None = None,
) -> tuple[str, str]:
    """Reads `source` and writes it to `target`; returns the (from, to) formats used."""
    source, target = os.fspath(source), os.fspath(target)
    if not os.path.isdir(source):
        raise UserError(f"{source}: no such checkpoint directory: give an HF or orbax folder")
    if dtype is not None and dtype not in NP_DTYPES:
        raise UserError(f"dtype={dtype!r}: choose one of {sorted(NP_DTYPES)}")
    from_format = from_format or ("hf" if is_hf_dir(source) else "orbax")
    to_format = to_format or ("orbax" if from_format == "hf" else "hf")
    for name, fmt in (("--from", from_format), ("--to", to_format)):
        if fmt not in FORMATS:
            raise UserError(f"{name} {fmt!r}: choose one of {FORMATS}")
    cfg, params = load(source, from_format, dtype)
    has_tokenizer = os.path.exists(os.path.join(source, "tokenizer.json"))
    save(target, to_format, cfg, params, source if has_tokenizer else "byte")
    return from_format, to_format


@errors.report_errors("deepseek-jax-convert")
def main(argv: list[str] | None = None) -> None:
    parser = Parser("deepseek-jax-convert", __doc__)
    parser.add_argument("source")
    parser.add_argument("target")
    parser.add_argument("--from", dest="from_format", choices=FORMATS)
    parser.add_argument("--to", dest="to_format", choices=FORMATS)
    parser.add_argument("--dtype", choices=sorted(NP_DTYPES))
    args = parser.parse_args(argv)
    used = convert(args.source, args.target, args.from_format, args.to_format, args.dtype)
    print(f"{args.source} ({used[0]}) -> {args.target} ({used[1]})")


if __name__ == "__main__":
    main()
