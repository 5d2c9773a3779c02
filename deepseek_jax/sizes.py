"""Model sizes from shapes alone: total and active parameters, inference cache per token.

python -m deepseek_jax.sizes --preset v2       # or --hf-config path/to/config.json
"""

from __future__ import annotations

import argparse
import math

import jax

from deepseek_jax.config import PRESETS, ModelConfig, preset
from deepseek_jax.errors import report_errors
from deepseek_jax.model.transformer import init_params


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Total and per-token active parameter counts, from `jax.eval_shape` of the model's init.

    Active = total minus what one token does not multiply by: the routed experts it does not
    use (E - K per MoE layer) and the embedding table (a row lookup). This reproduces the
    paper's 21B (V2) and 2.4B (V2-Lite).
    """
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    total = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    one_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    unused = cfg.num_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * one_expert
    embedding = cfg.vocab_size * cfg.hidden_size
    return {"total": total, "active": total - unused - embedding}


def cache_bytes_per_token(cfg: ModelConfig, bytes_per_number: int = 2) -> dict[str, int]:
    """Inference cache per token over all layers: MLA latent vs a per-head K/V cache."""
    layers = cfg.num_hidden_layers
    return {
        "latent": layers * cfg.latent_cache_dim * bytes_per_number,
        "expanded": layers * cfg.expanded_cache_dim * bytes_per_number,
    }


def summary(cfg: ModelConfig) -> str:
    counts = param_counts(cfg)
    cache = cache_bytes_per_token(cfg)
    return "\n".join(
        [
            f"total params      {counts['total'] / 1e9:10.3f} B  ({counts['total']:,})",
            f"active per token  {counts['active'] / 1e9:10.3f} B  ({counts['active']:,})",
            f"latent cache      {cache['latent']:10,d} bytes/token (bf16, {cfg.num_hidden_layers}"
            f" layers x {cfg.latent_cache_dim} numbers)",
            f"expanded K/V      {cache['expanded']:10,d} bytes/token (bf16, what MHA would cache;"
            f" {cache['expanded'] / cache['latent']:.1f}x the latent)",
        ]
    )


@report_errors("sizes")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="v2", choices=sorted(PRESETS))
    parser.add_argument("--hf-config", help="a config.json or checkpoint dir instead of a preset")
    args = parser.parse_args(argv)
    cfg = ModelConfig.from_hf(args.hf_config) if args.hf_config else preset(args.preset)
    print(summary(cfg))


if __name__ == "__main__":
    main()
