"""The experiment configs shipped with the package, selectable by name or by file: the
command line's edge, where ml-collections ends and the library's typed settings begin.

Each module here has `get_config()` returning an ml-collections ConfigDict that starts from
`base_config(preset)`, so users keep `--config.train.steps=...` overrides. Commands take
`--config NAME` (a module of this folder: `default`, `tiny`, `v2_lite`, ...) or `--config
path/to/file.py` (any file with a `get_config()`), so a pip or git install runs every
experiment without the repository, and hand the library `from_config_dict(config)`: a
`train.settings.RunConfig`.

    mode       pretrain | sft | grpo (train.py runs the matching loop)
    model      every ModelConfig field (a preset's values), overridable one by one
    data       source, path, tokenizer, seq_len, held-out share (data.pipeline.DataSettings)
    optimizer  AdamW and the schedule (paper 3.2.1 values)
    mesh       device mesh axis sizes (deepseek_jax/parallel)
    train      steps, batch, accumulation, logging, eval, checkpoints, run directory
    grpo       configs/grpo.py only: GRPO's samples, reward and objective
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os

import ml_collections

from deepseek_jax.config import ModelConfig, preset
from deepseek_jax.errors import UserError
from deepseek_jax.train import settings

FOLDER = os.path.dirname(os.path.abspath(__file__))
# The ConfigDict's sections and the typed settings each becomes.
SECTIONS = {
    "model": ModelConfig,
    "data": settings.DataSettings,
    "optimizer": settings.OptimizerSettings,
    "mesh": settings.MeshSettings,
    "train": settings.TrainSettings,
    "grpo": settings.GRPOSettings,
}


def base_config(model_preset: str) -> ml_collections.ConfigDict:
    """The typed defaults (`train.settings`) with the preset's model, as a ConfigDict."""
    return ml_collections.ConfigDict(settings.RunConfig(model=preset(model_preset)).to_dict())


def from_config_dict(config: ml_collections.ConfigDict) -> settings.RunConfig:
    """The typed RunConfig of a config; a key no settings class has is refused by name."""
    fields = config.to_dict()
    typed = {}
    for name, value in fields.items():
        if name == "mode":
            typed[name] = value
        elif name in SECTIONS:
            typed[name] = section(SECTIONS[name], value, name)
        else:
            raise UserError(
                f"--config.{name}: not a section of a run config (mode, {', '.join(SECTIONS)})"
                ": remove it or correct its name"
            )
    try:
        return settings.RunConfig(**typed)
    except ValueError as e:
        raise UserError(f"--config.{e}") from None


def section(kind: type, fields: dict, name: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UserError(
            f"--config.{name}.{unknown[0]}: {kind.__name__} has no such field (unknown: "
            f"{unknown}): remove it or correct its name"
        )
    try:
        return kind(**fields)
    except (TypeError, ValueError) as e:
        raise UserError(f"--config.{name}: {e}") from None


def names() -> list[str]:
    """The configs shipped in this folder."""
    return sorted(n[:-3] for n in os.listdir(FOLDER) if n.endswith(".py") and not n.startswith("_"))


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a shipped config (by name) or of a .py file (by path)."""
    if name_or_path in names():
        module = importlib.import_module(f"{__name__}.{name_or_path}")
    elif name_or_path.endswith(".py") and os.path.isfile(name_or_path):
        module_name = "_config_" + os.path.basename(name_or_path)[:-3]
        spec = importlib.util.spec_from_file_location(module_name, name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        raise UserError(
            f"--config {name_or_path!r}: not a config of the package ({', '.join(names())}) "
            "nor a .py file with get_config()"
        )
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {name_or_path!r}: the file defines no get_config()")
    return module.get_config()
