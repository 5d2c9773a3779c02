"""Checkpoints: HF/PyTorch import and export (hf.py), orbax save and restore (orbax.py), hub
ids (hub.py). Three ways in, one placement: every reader puts leaves straight onto the
shardings it is given (the rules table's on a mesh), never a whole host copy first.

    cfg, params = load_checkpoint("deepseek-ai/DeepSeek-V2-Lite-Chat", mesh=mesh)
    params = read_weights("runs/sft:400", cfg, shardings)      # train.init_from
"""

from __future__ import annotations

import os
import re

from jax.sharding import Mesh

from deepseek_jax.checkpoint import hf
from deepseek_jax.checkpoint.hf import load_hf, save_hf
from deepseek_jax.checkpoint.hub import local_dir
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import UserError


def is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def split_step(source: str | os.PathLike) -> tuple[str, int | None]:
    """ "runs/sft:400" -> ("runs/sft", 400); a source without ":<digits>" -> (source, None)."""
    source = os.fspath(source)
    match = re.fullmatch(r"(.+):(\d+)", source)
    if match and not os.path.exists(source):
        return match[1], int(match[2])
    return source, None


def load_checkpoint(
    path: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None
) -> tuple[ModelConfig, dict]:
    """(cfg, params) from an HF checkpoint dir, a hub id, or a train.py run dir[:step];
    with a mesh, each leaf is read straight onto its devices by the rules table."""
    source, step = split_step(path)
    directory = local_dir(source)
    if is_hf_dir(directory):
        if step is not None:
            raise UserError(f"{path}: an HF checkpoint has no steps: drop the ':{step}'")
        return load_hf(directory, dtype=dtype, mesh=mesh)
    from deepseek_jax.checkpoint import orbax  # noqa: PLC0415  (orbax is slow to import)

    cfg = orbax.read_model_config(directory)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=dtype)
    return cfg, orbax.load_params(directory, step, hf.placement(cfg, mesh), dtype=dtype)[1]


def read_weights(source: str | os.PathLike, cfg: ModelConfig, shardings: dict) -> dict:
    """The params a run starts from (`train.init_from`): an HF dir, a hub id or a run dir
    [:step], read straight onto `shardings` in cfg.param_dtype. The checkpoint's architecture
    must be cfg's (the first field that differs is named); execution fields may differ."""
    path, step = split_step(source)
    directory = local_dir(path)
    if is_hf_dir(directory):
        if step is not None:
            raise UserError(f"init_from={source}: an HF checkpoint has no steps: drop ':{step}'")
        theirs, tensors = hf.open_checkpoint(directory)
    else:
        from deepseek_jax.checkpoint import orbax  # noqa: PLC0415

        theirs = orbax.read_model_config(directory)
    difference = theirs.architecture_difference(cfg)
    if difference is not None:
        raise UserError(
            f"init_from={source} holds another model: {difference} (checkpoint vs "
            "config.model): set config.model's architecture to the checkpoint's"
        )
    if is_hf_dir(directory):
        return hf.read_params(cfg, tensors, shardings)[0]
    return orbax.load_params(directory, step, shardings, dtype=cfg.param_dtype)[1]


__all__ = [
    "is_hf_dir",
    "load_checkpoint",
    "load_hf",
    "read_weights",
    "save_hf",
    "split_step",
]
