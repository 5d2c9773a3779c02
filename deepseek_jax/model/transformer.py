"""The DeepSeek-V2 decoder: embedding, dense then MoE blocks (each stacked with `nn.scan`), head.

Legend: B batch, T query positions, S key positions, D model width, V vocabulary,
L layers, C + R latent-cache width.

    out = DeepSeekV2(cfg).apply({"params": params}, tokens_BT)
    out.logits [B, T, V]; out.aux: balance losses (summed over MoE layers) and load [L_moe, E]

Attention is causal within a sequence. `segment_ids` [B, T] (packed documents) confine it to
one document; give `positions` that restart at each document. With `cache` (a dict of
[L, B, S, C + R] latents from `init_cache`), the new tokens are written at their positions and
attention runs in MLA's absorbed form over the cache: that is the decode step.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.layers import MLP, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE, MoEAux
from deepseek_jax.model.rope import rope_cos_sin

# Names of the block's two sublayer outputs (checkpoint_name), for the policies below.
BLOCK_OUTPUTS = ("attn_out", "ffn_out")
REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep MLA's and the FFN's outputs, recompute inside them: the backward of the FFN then
    # starts without re-running attention, for two [B, T, D] arrays per layer.
    "block_outputs": jax.checkpoint_policies.save_only_these_names(*BLOCK_OUTPUTS),
}


@struct.dataclass
class Aux:
    """Training signals from the MoE layers (zeros and an empty load for an all-dense model)."""

    expert_loss: jnp.ndarray  # alpha1 * L_ExpBal, summed over MoE layers
    device_loss: jnp.ndarray  # alpha2 * L_DevBal
    comm_loss: jnp.ndarray  # alpha3 * L_CommBal
    load: jnp.ndarray  # [L_moe, E] share of assignments per expert

    @property
    def total(self) -> jnp.ndarray:
        return self.expert_loss + self.device_loss + self.comm_loss


@struct.dataclass
class Output:
    logits: jnp.ndarray  # [B, T, V]
    aux: Aux
    cache: dict  # decode: the updated cache; full forward: this call's latents [L, B, T, C+R]


class Block(nn.Module):
    """Pre-norm decoder block: x + MLA(norm x), then + FFN(norm x); FFN dense or MoE."""

    cfg: ModelConfig
    moe: bool
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x_BTD, cos, sin, mask, positions_BT, cache_BSL):
        cfg = self.cfg
        with jax.named_scope("mla"):
            h, latents = MLA(cfg, self.mesh, name="attn")(
                RMSNorm(cfg, name="attn_norm")(x_BTD), cos, sin, mask, positions_BT, cache_BSL
            )
        x_BTD = x_BTD + checkpoint_name(h, "attn_out")
        normed = RMSNorm(cfg, name="mlp_norm")(x_BTD)
        if self.moe:
            with jax.named_scope("moe"):
                h, aux = MoE(cfg, self.mesh, name="mlp")(normed)
        else:
            h, aux = MLP(cfg, cfg.intermediate_size, name="mlp")(normed), None
        return x_BTD + checkpoint_name(h, "ffn_out"), (latents, aux)


def stack(
    cfg: ModelConfig, moe: bool, length: int, with_cache: bool, name: str, mesh: Mesh | None
) -> nn.Module:
    """`length` blocks with params stacked on a leading "layers" axis, rematerialised per policy."""
    block = Block
    if cfg.remat_policy != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(
            nn.broadcast,
            nn.broadcast,
            nn.broadcast,
            nn.broadcast,
            0 if with_cache else nn.broadcast,
        ),
        length=length,
        unroll=min(cfg.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, moe, mesh, name=name)


def attention_mask(positions_BT, segment_ids_BT, cache_len: int | None) -> jnp.ndarray:
    """[B, T, S] booleans: which keys each query may see."""
    if cache_len is not None:  # cache slot index == position
        return jnp.arange(cache_len)[None, None, :] <= positions_BT[:, :, None]
    t = positions_BT.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    if segment_ids_BT is not None:
        mask = mask & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    return mask


class DeepSeekV2(nn.Module):
    """DeepSeek-V2 causal LM: tokens [B, T] int -> Output.

    With a `mesh` (`deepseek_jax.parallel.mesh.make_mesh`), the MoE layers dispatch their routed
    experts by all-to-all over its "expert" axis; B * T must split over the "batch" rule's axes.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None) -> Output:
        cfg = self.cfg
        b, t = tokens_BT.shape
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.initializer_range), ("vocab", "embed")
            ),
            dtype=cfg.dtype,
            param_dtype=jnp.dtype(cfg.param_dtype),
            name="embed",
        )
        x = embed(tokens_BT)
        cos, sin = rope_cos_sin(cfg, positions_BT)
        cache_len = None if cache is None else next(iter(cache.values())).shape[2]
        mask = attention_mask(positions_BT, segment_ids_BT, cache_len)

        new_cache, moe_aux = {}, None
        for key, moe, length in (
            ("dense", False, cfg.first_k_dense_replace),
            ("moe", True, cfg.num_moe_layers),
        ):
            if length == 0:
                continue
            layers = stack(cfg, moe, length, cache is not None, f"{key}_layers", self.mesh)
            x, (new_cache[key], aux) = layers(
                x, cos, sin, mask, positions_BT, None if cache is None else cache[key]
            )
            if moe:
                moe_aux = aux

        x = RMSNorm(cfg, name="final_norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(
                    nn.initializers.normal(stddev=cfg.initializer_range), ("embed", "vocab")
                ),
                (cfg.hidden_size, cfg.vocab_size),
                jnp.dtype(cfg.param_dtype),
            )
            logits = x @ head.astype(cfg.dtype)
        return Output(logits=logits, aux=summarize_aux(cfg, moe_aux), cache=new_cache)


def summarize_aux(cfg: ModelConfig, per_layer: MoEAux | None) -> Aux:
    if per_layer is None:
        zero = jnp.zeros((), jnp.float32)
        return Aux(zero, zero, zero, jnp.zeros((0, cfg.n_routed_experts), jnp.float32))
    return Aux(
        expert_loss=per_layer.expert_loss.sum(),
        device_loss=per_layer.device_loss.sum(),
        comm_loss=per_layer.comm_loss.sum(),
        load=per_layer.load,
    )


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """Zeroed latent cache: {"dense": [L_dense, B, S, C+R], "moe": [L_moe, B, S, C+R]}."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    sizes = {"dense": cfg.first_k_dense_replace, "moe": cfg.num_moe_layers}
    return {
        key: jnp.zeros((n, batch, length, cfg.latent_cache_dim), dtype)
        for key, n in sizes.items()
        if n
    }


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """A fresh params tree (plain arrays, logical-axis boxes removed)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = DeepSeekV2(cfg).init(rng, tokens)["params"]
    return nn.meta.unbox(boxed)


def logical_axes(cfg: ModelConfig) -> dict:
    """The params tree with each leaf replaced by its logical axis names (a PartitionSpec)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: DeepSeekV2(cfg).init(jax.random.key(0), tokens)["params"])
    return nn.get_partition_spec(boxed)
