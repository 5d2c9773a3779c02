"""deepseek-jax: DeepSeek-V2 (MLA + DeepSeekMoE) in JAX/Flax. The public API (docs/design.md 4)."""

from deepseek_jax.checkpoint import load_checkpoint, load_hf, save_hf
from deepseek_jax.config import ModelConfig, YarnConfig, preset
from deepseek_jax.generate.loop import generate
from deepseek_jax.model.transformer import (
    DeepSeekV2,
    Output,
    init_cache,
    init_params,
    unstack_params,
)
from deepseek_jax.parallel.mesh import make_mesh
from deepseek_jax.parallel.placement import shard_params

__all__ = [
    "DeepSeekV2",
    "ModelConfig",
    "Output",
    "YarnConfig",
    "generate",
    "init_cache",
    "init_params",
    "load_checkpoint",
    "load_hf",
    "make_mesh",
    "preset",
    "save_hf",
    "shard_params",
    "unstack_params",
]
