"""The DeepSeek-V2 decoder: embedding, dense then MoE blocks (each stacked with `nn.scan`), head.

Legend: B batch, T query positions, S key positions, D model width, V vocabulary,
L layers, C + R latent-cache width.

    out = DeepSeekV2(cfg).apply({"params": params}, tokens_BT)
    out.logits [B, T, V]; out.aux: balance losses (summed over MoE layers) and load [L_moe, E]
    out = DeepSeekV2(cfg, mesh=mesh).apply({"params": params}, tokens_BT, train=True)
    the train step's call: on a mesh the MoE applies cfg.capacity_factor (token dropping,
    paper 2.2.4); every other call is dropless. out.aux also reports drop rates and fan-out.

Attention is causal within a sequence. `segment_ids` [B, T] (packed documents) confine it to
one document; give `positions` that restart at each document. `token_mask` [B, T] (1 real,
0 padding; None: all real) keeps padding out of the MoE balance losses. With `cache` (a dict
of [L, B, S, C + R] latents from `init_cache`), the new tokens are written at their positions
and attention runs in MLA's absorbed form over the cache: that is the decode step
(`deepseek_jax.generate` runs it with `scan_layers=False` on `unstack_params(params)`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig, matmul_precision, resolve_dtype
from deepseek_jax.errors import UserError
from deepseek_jax.model.layers import MLP, RMSNorm
from deepseek_jax.model.mla import MLA
from deepseek_jax.model.moe import MoE, MoEAux
from deepseek_jax.model.rope import rope_cos_sin
from deepseek_jax.parallel.rules import constrain

# Logical axes of the residual stream [B, T, D] at block boundaries (the one rules table).
RESIDUAL = ("batch", "length", "act_embed")

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
    drop_rate: jnp.ndarray  # [L_moe] share of assignments dropped (train=True on a mesh)
    never_drop_drop_rate: jnp.ndarray  # [L_moe] the same over never-drop tokens (must be 0)
    fanout_mean: jnp.ndarray  # [L_moe] devices a token's rows reached, mean
    fanout_max: jnp.ndarray  # [L_moe] ... and max (<= M)

    @property
    def total(self) -> jnp.ndarray:
        return self.expert_loss + self.device_loss + self.comm_loss


@struct.dataclass
class Output:
    logits: jnp.ndarray  # [B, T, V]
    aux: Aux
    # decode: the updated cache; full forward: this call's latents [L, B, T, C+R]; with
    # scan_layers=False, a list of L [B, ., C+R] arrays per stack instead
    cache: dict


class Block(nn.Module):
    """Pre-norm decoder block: x + MLA(norm x), then + FFN(norm x); FFN dense or MoE."""

    cfg: ModelConfig
    moe: bool
    mesh: Mesh | None = None
    train: bool = False  # the train step's call: the MoE may drop tokens (paper 2.2.4)

    @nn.compact
    def __call__(
        self, x_BTD, cos, sin, positions_BT, segment_ids_BT, cache_BSL, token_mask_BT=None
    ):
        cfg = self.cfg
        x_BTD = constrain(x_BTD, self.mesh, RESIDUAL)
        with jax.named_scope("mla"):
            h, latents = MLA(cfg, self.mesh, name="attn")(
                RMSNorm(cfg, name="attn_norm")(x_BTD),
                cos,
                sin,
                positions_BT,
                segment_ids_BT,
                cache_BSL,
            )
        x_BTD = x_BTD + checkpoint_name(h, "attn_out")
        normed = RMSNorm(cfg, name="mlp_norm")(x_BTD)
        if self.moe:
            with jax.named_scope("moe"):
                h, aux = MoE(cfg, self.mesh, self.train, name="mlp")(normed, token_mask_BT)
        else:
            h, aux = MLP(cfg, cfg.intermediate_size, name="mlp")(normed), None
        x_BTD = x_BTD + checkpoint_name(h, "ffn_out")
        return constrain(x_BTD, self.mesh, RESIDUAL), (latents, aux)


def stack(
    cfg: ModelConfig,
    moe: bool,
    length: int,
    with_cache: bool,
    name: str,
    mesh: Mesh | None,
    train: bool = False,
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
            nn.broadcast,  # cos
            nn.broadcast,  # sin
            nn.broadcast,  # positions
            nn.broadcast,  # segment ids
            0 if with_cache else nn.broadcast,
            nn.broadcast,  # token mask
        ),
        length=length,
        unroll=min(cfg.scan_unroll, length),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, moe, mesh, train, name=name)


class DeepSeekV2(nn.Module):
    """DeepSeek-V2 causal LM: tokens [B, T] int -> Output.

    With a `mesh` (`deepseek_jax.parallel.mesh.make_mesh`), the MoE layers dispatch their routed
    experts by all-to-all over its "expert" axis; B * T must split over the "batch" rule's axes.

    `scan_layers=False` applies the same blocks one by one to per-layer params
    (`unstack_params`): the decode loop's form, where XLA:CPU would otherwise copy each layer's
    weights out of the stacked arrays at every step (~30% of a `small` decode step, measured).
    `logits_at_BK` [B, K] int: compute the head only at these positions (logits [B, K, V]),
    as a prefill that needs one row of logits per prompt does.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None
    scan_layers: bool = True

    @nn.compact
    def __call__(
        self,
        tokens_BT,
        positions_BT=None,
        segment_ids_BT=None,
        cache=None,
        logits_at_BK=None,
        train=False,
        token_mask_BT=None,
    ) -> Output:
        cfg = resolve_dtype(self.cfg, self.mesh)  # "auto": bf16 for TPU/GPU, fp32 on the CPU
        with jax.default_matmul_precision(matmul_precision(cfg)):
            b, t = tokens_BT.shape
            if t > cfg.max_position_embeddings:
                raise UserError(
                    f"a sequence of {t} tokens is longer than max_position_embeddings="
                    f"{cfg.max_position_embeddings}: shorten it, or use a config with a longer "
                    "context (rope_scaling / YaRN)"
                )
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

            new_cache, moe_aux = {}, None
            for key, moe, length in stacks(cfg):
                cache_L = None if cache is None else cache[key]
                args = (cos, sin, positions_BT, segment_ids_BT)
                if self.scan_layers:
                    layers = stack(
                        cfg, moe, length, cache is not None, f"{key}_layers", self.mesh, train
                    )
                    x, (new_cache[key], aux) = layers(x, *args, cache_L, token_mask_BT)
                else:
                    per_layer = []
                    for l in range(length):
                        block = Block(cfg, moe, self.mesh, train, name=f"{key}_layers_{l}")
                        cache_l = None if cache is None else cache_L[l]
                        x, out = block(x, *args, cache_l, token_mask_BT)
                        per_layer.append(out)
                    latents, auxes = zip(*per_layer, strict=True)
                    # One array a layer, not stacked: the decode loop carries them so, where a
                    # stack would copy the whole cache every step.
                    new_cache[key] = list(latents)
                    aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes)
                if moe:
                    moe_aux = aux

            if logits_at_BK is not None:
                x = jnp.take_along_axis(x, logits_at_BK[..., None], axis=1)  # BKD
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


def stacks(cfg: ModelConfig) -> list[tuple[str, bool, int]]:
    """(cache key, is MoE, layers) of each non-empty stack, in order: dense first, then MoE."""
    both = (("dense", False, cfg.first_k_dense_replace), ("moe", True, cfg.num_moe_layers))
    return [(key, moe, length) for key, moe, length in both if length]


def unstack_params(cfg: ModelConfig, params: dict, delete: bool = False) -> dict:
    """The params of `DeepSeekV2(cfg, scan_layers=False)`: each stacked `{key}_layers` tree
    [L, ...] split into `{key}_layers_{l}` trees, one per layer; other params as they are.

    delete: delete each stacked array once it is split (`params` unusable after), so that the
    peak is the params plus their largest stacked array, not the layers twice (V2-Lite in bf16:
    8.9 GiB more, not 28.5 GiB). jax.Arrays only, outside jit.
    """
    flat = {k: v for k, v in params.items() if not k.endswith("_layers")}
    for key, _, length in stacks(cfg):
        leaves, treedef = jax.tree.flatten(params[f"{key}_layers"])
        per_leaf = []
        for stacked in leaves:
            per_leaf.append([stacked[l] for l in range(length)])
            if delete:
                stacked.delete()
        for l in range(length):
            flat[f"{key}_layers_{l}"] = treedef.unflatten([layers[l] for layers in per_leaf])
    return flat


def summarize_aux(cfg: ModelConfig, per_layer: MoEAux | None) -> Aux:
    if per_layer is None:
        zero, none = jnp.zeros((), jnp.float32), jnp.zeros((0,), jnp.float32)
        load = jnp.zeros((0, cfg.n_routed_experts), jnp.float32)
        return Aux(zero, zero, zero, load, none, none, none, none)
    return Aux(
        expert_loss=per_layer.expert_loss.sum(),
        device_loss=per_layer.device_loss.sum(),
        comm_loss=per_layer.comm_loss.sum(),
        load=per_layer.load,
        drop_rate=per_layer.drop_rate,
        never_drop_drop_rate=per_layer.never_drop_drop_rate,
        fanout_mean=per_layer.fanout_mean,
        fanout_max=per_layer.fanout_max,
    )


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict:
    """Zeroed latent cache: {"dense": [L_dense, B, S, C+R], "moe": [L_moe, B, S, C+R]}, in
    `dtype` or the compute dtype (for a mesh's platform, resolve cfg before)."""
    dtype = jnp.dtype(dtype or resolve_dtype(cfg).dtype)
    return {
        key: jnp.zeros((n, batch, length, cfg.latent_cache_dim), dtype) for key, _, n in stacks(cfg)
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
