"""DeepSeekMoE (paper section 2.2): shared experts, routed experts, the router, balance losses.

Legend: B batch, T positions, D model width, I expert width, E routed experts,
K experts per token, G routing groups (devices), M groups a token may reach, N = B*T tokens,
A = N*K assignments.

    h' = h + sum_i FFN_shared_i(h) + sum_i g_i FFN_routed_i(h)          (20)
    g_i = s_i if s_i in TopK(s, K) else 0,   s = softmax(h . e_i)     (21-22)

This file is the plain, single-device dispatch: dropless, every assignment computed. The
expert-parallel all-to-all dispatch lives in `deepseek_jax/parallel/` and is tested against it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels.gmm import routed_swiglu
from deepseek_jax.model.layers import MLP, grouped_swiglu, weight
from deepseek_jax.parallel.expert import expert_parallel, never_drop_tokens

# Up to this many tokens (decode), every expert gets a slot per token: see slotted_swiglu.
SLOTTED_MAX_TOKENS = 64


@struct.dataclass
class Routing:
    """The router's decision for N tokens."""

    scores: jnp.ndarray  # [N, E] float32 softmax affinities s
    experts: jnp.ndarray  # [N, K] int32 chosen experts
    weights: jnp.ndarray  # [N, K] gate values g (scaled, in float32)


def route(cfg: ModelConfig, x_ND: jnp.ndarray, centroids_DE: jnp.ndarray) -> Routing:
    """Top-K routing, greedy or device-limited (group_limited_greedy, paper 2.2.2)."""
    logits = x_ND.astype(jnp.float32) @ centroids_DE.astype(jnp.float32)
    scores = jax.nn.softmax(logits, axis=-1)  # NE
    candidates = scores
    if cfg.topk_method == "group_limited_greedy":
        n = scores.shape[0]
        # A group's score is the max affinity of its experts; keep the top-M groups.
        grouped = scores.reshape(n, cfg.n_group, cfg.experts_per_group)
        _, kept = jax.lax.top_k(grouped.max(axis=-1), cfg.topk_group)  # NM
        keep = jnp.zeros((n, cfg.n_group), bool).at[jnp.arange(n)[:, None], kept].set(True)
        candidates = jnp.where(keep[:, :, None], grouped, 0.0).reshape(n, -1)
    weights, experts = jax.lax.top_k(candidates, cfg.num_experts_per_tok)  # NK
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return Routing(scores, experts.astype(jnp.int32), weights * cfg.routed_scaling_factor)


def balance_losses(cfg: ModelConfig, routing: Routing, batch: int) -> dict[str, jnp.ndarray]:
    """The three auxiliary losses of paper 2.2.3, per sequence, averaged over the batch.

    Also returns `load` [E]: the fraction of this layer's assignments each expert received.
    """
    e, k, g, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.groups_per_token
    chosen = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(axis=1)  # NE, 0/1
    chosen_BTE = chosen.reshape(batch, -1, e)
    t = chosen_BTE.shape[1]
    f = chosen_BTE.sum(axis=1) * e / (k * t)  # BE   (24) f_i
    p = routing.scores.reshape(batch, -1, e).mean(axis=1)  # BE   (25) P_i
    expert_loss = jnp.sum(f * p, axis=-1)  # (23)

    f_dev = f.reshape(batch, g, -1).mean(axis=-1)  # BG   (27) f'_d
    p_dev = p.reshape(batch, g, -1).sum(axis=-1)  # BG   (28) P'_d
    device_loss = jnp.sum(f_dev * p_dev, axis=-1)  # (26)

    sent = chosen_BTE.reshape(batch, t, g, -1).max(axis=-1)  # BTG: token t reaches device d
    f_comm = sent.sum(axis=1) * g / (m * t)  # (30) f''_d
    comm_loss = jnp.sum(f_comm * p_dev, axis=-1)  # (29), P''_d = P'_d (31)
    return {
        "expert_loss": cfg.aux_loss_alpha1 * expert_loss.mean(),
        "device_loss": cfg.aux_loss_alpha2 * device_loss.mean(),
        "comm_loss": cfg.aux_loss_alpha3 * comm_loss.mean(),
        "load": chosen.sum(axis=0) / chosen.sum(),
    }


def slotted_swiglu(cfg: ModelConfig, x_ND, routing: Routing, w_gate, w_up, w_down):
    """The same sum as `layers.grouped_swiglu`, for few tokens (decode): N slots per expert.

    A token picks an expert at most once, so slot n of expert e can hold token n: dropless
    by construction, and the experts run as one batched matmul over the weights where they
    lie. The tiled path instead gathers a weight copy per tile, which at decode (one tile
    per expert hit, almost all padding) costs ~10x more on the CPU (measured, `small`).
    """
    n, d = x_ND.shape
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    token_NK = jnp.broadcast_to(jnp.arange(n)[:, None], (n, k))
    x_END = jnp.zeros((e, n, d), x_ND.dtype).at[routing.experts, token_NK].set(x_ND[:, None])
    with jax.named_scope("experts"):
        h = jax.nn.silu(jnp.einsum("END,EDI->ENI", x_END, w_gate))
        h = h * jnp.einsum("END,EDI->ENI", x_END, w_up)
        y_END = jnp.einsum("ENI,EID->END", h, w_down)
    y_NKD = y_END[routing.experts, token_NK]
    return jnp.einsum("NKD,NK->ND", y_NKD, routing.weights.astype(y_NKD.dtype))


@struct.dataclass
class MoEAux:
    expert_loss: jnp.ndarray
    device_loss: jnp.ndarray
    comm_loss: jnp.ndarray
    load: jnp.ndarray  # [E]


class MoE(nn.Module):
    """Shared experts + routed experts: x [B, T, D] -> (y [B, T, D], MoEAux).

    With a `mesh`, the routed experts go through the expert-parallel all-to-all dispatch
    (`deepseek_jax.parallel.expert`), with token dropping when cfg.capacity_factor is set.
    """

    cfg: ModelConfig
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray) -> tuple[jnp.ndarray, MoEAux]:
        cfg = self.cfg
        b, t, d = x_BTD.shape
        e, i = cfg.n_routed_experts, cfg.moe_intermediate_size
        centroids = self.param(
            "centroids",
            nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.initializer_range), ("embed", "expert_route")
            ),
            (d, e),
            jnp.dtype(cfg.param_dtype),
        )
        w_gate = weight(self, "w_gate", cfg, (e, d, i), ("expert", "embed", "expert_mlp"))
        w_up = weight(self, "w_up", cfg, (e, d, i), ("expert", "embed", "expert_mlp"))
        w_down = weight(self, "w_down", cfg, (e, i, d), ("expert", "expert_mlp", "embed"))

        x_ND = x_BTD.reshape(b * t, d)
        if self.mesh is None:
            with jax.named_scope("router"):
                routing = route(cfg, x_ND, centroids)
            if b * t <= SLOTTED_MAX_TOKENS:
                routed = slotted_swiglu(cfg, x_ND, routing, w_gate, w_up, w_down)
            else:
                routed = routed_swiglu(
                    cfg.kernels,
                    grouped_swiglu,
                    x_ND,
                    routing.experts,
                    routing.weights,
                    w_gate,
                    w_up,
                    w_down,
                )
        else:
            never_drop = never_drop_tokens(cfg, b, t)
            routed, routing, _ = expert_parallel(
                cfg, self.mesh, route, x_ND, never_drop, centroids, w_gate, w_up, w_down
            )
        y = routed.reshape(b, t, d)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.n_shared_experts * i, name="shared")(x_BTD)
        return y, MoEAux(**balance_losses(cfg, routing, b))
