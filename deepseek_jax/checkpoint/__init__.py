"""Checkpoints: HF/PyTorch import and export (hf.py), orbax save and restore (orbax.py)."""

from __future__ import annotations

import os

from deepseek_jax.checkpoint.hf import load_hf, save_hf
from deepseek_jax.config import ModelConfig


def is_hf_dir(path: str) -> bool:
    return os.path.exists(os.path.join(path, "config.json"))


def load_checkpoint(path: str | os.PathLike, dtype: str | None = None) -> tuple[ModelConfig, dict]:
    """(cfg, params) from an HF checkpoint dir or an orbax dir written by train.py."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist or is not a directory")
    if is_hf_dir(path):
        return load_hf(path, dtype=dtype)
    from deepseek_jax.checkpoint.orbax import load_params  # noqa: PLC0415  (orbax is slow to import)

    return load_params(path)


__all__ = ["is_hf_dir", "load_checkpoint", "load_hf", "save_hf"]
