"""deepseek-jax: DeepSeek-V2 (MLA + DeepSeekMoE) in JAX/Flax. The public API (docs/design.md 4).

    import deepseek_jax as dj
    cfg, params = dj.load_hf(path_or_hub_id)          # HF checkpoint -> (ModelConfig, params)
    out = dj.DeepSeekV2(cfg).apply({"params": params}, tokens)
    new = dj.generate(cfg, params, prompts, max_new_tokens=64)

The names load on first use (PEP 562): `import deepseek_jax` stays cheap, so a command that
refuses a mistyped flag answers before jax, flax and orbax are imported (seconds).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# name -> the module that defines it
_API = {
    "DeepSeekV2": "deepseek_jax.model.transformer",
    "ModelConfig": "deepseek_jax.config",
    "Output": "deepseek_jax.model.transformer",
    "YarnConfig": "deepseek_jax.config",
    "generate": "deepseek_jax.generate.loop",
    "init_cache": "deepseek_jax.model.transformer",
    "init_params": "deepseek_jax.model.transformer",
    "load_checkpoint": "deepseek_jax.checkpoint",
    "load_hf": "deepseek_jax.checkpoint",
    "make_mesh": "deepseek_jax.parallel.mesh",
    "preset": "deepseek_jax.config",
    "save_hf": "deepseek_jax.checkpoint",
    "shard_params": "deepseek_jax.parallel.rules",
}
__all__ = sorted(_API)

if TYPE_CHECKING:  # what type checkers and IDEs read; `x as x` marks a re-export
    from deepseek_jax.checkpoint import load_checkpoint as load_checkpoint
    from deepseek_jax.checkpoint import load_hf as load_hf
    from deepseek_jax.checkpoint import save_hf as save_hf
    from deepseek_jax.config import ModelConfig as ModelConfig
    from deepseek_jax.config import YarnConfig as YarnConfig
    from deepseek_jax.config import preset as preset
    from deepseek_jax.generate.loop import generate as generate
    from deepseek_jax.model.transformer import DeepSeekV2 as DeepSeekV2
    from deepseek_jax.model.transformer import Output as Output
    from deepseek_jax.model.transformer import init_cache as init_cache
    from deepseek_jax.model.transformer import init_params as init_params
    from deepseek_jax.parallel.mesh import make_mesh as make_mesh
    from deepseek_jax.parallel.rules import shard_params as shard_params


def __getattr__(name: str):
    if name not in _API:  # a submodule (dj.config.PRESETS), as the eager imports gave
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists and lacks a dependency: say which
            raise AttributeError(f"module 'deepseek_jax' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # once: later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
