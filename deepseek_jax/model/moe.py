"""DeepSeekMoE (paper section 2.2): shared experts, routed experts, the router, balance losses.

Legend: B batch, T positions, D model width, I expert width, E routed experts,
K experts per token, G routing groups (devices), M groups a token may reach, N = B*T tokens,
A = N*K assignments.

    h' = h + sum_i FFN_shared_i(h) + sum_i g_i FFN_routed_i(h)          (20)
    g_i = s_i if s_i in TopK(s, K) else 0,   s = softmax(h . e_i)     (21-22)

This file holds the router, the balance losses and the single-device dispatch: dropless,
every assignment computed by the grouped matmul of `experts.py`, or, for decode-sized
batches, by `few_token_experts` (a loop over the chosen experts on the CPU; a gather of the
chosen experts or every expert at once on a GPU). `reference_experts` is the plain, readable
dispatch (one gather and einsum over assignments) that tests hold the fast paths to. The
expert-parallel all-to-all dispatch lives in `deepseek_jax/parallel/expert.py`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh

from deepseek_jax.config import ModelConfig
from deepseek_jax.model.experts import routed_experts
from deepseek_jax.model.layers import MLP, weight
from deepseek_jax.parallel.expert import expert_parallel, never_drop_tokens
from deepseek_jax.parallel.rules import constrain


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


def balance_losses(
    cfg: ModelConfig, routing: Routing, batch: int, token_mask_N: jnp.ndarray | None = None
) -> dict[str, jnp.ndarray]:
    """The three auxiliary losses of paper 2.2.3, per sequence, averaged over the batch.

    Only real tokens count: `token_mask_N` [N] (1 real, 0 padding; None: all real) removes
    the rest from f and P, T is each sequence's count of real tokens, and a sequence with
    none is left out of the batch mean. Also returns `load` [E]: the fraction of this
    layer's (real) assignments each expert received.
    """
    e, k, g, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.groups_per_token
    real_N = jnp.ones(routing.scores.shape[0]) if token_mask_N is None else token_mask_N
    real_N = real_N.astype(jnp.float32)
    chosen = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(axis=1)  # NE, 0/1
    chosen = chosen * real_N[:, None]
    chosen_BTE = chosen.reshape(batch, -1, e)
    t = chosen_BTE.shape[1]
    t_B1 = jnp.maximum(real_N.reshape(batch, t).sum(axis=1, keepdims=True), 1.0)  # real T
    f = chosen_BTE.sum(axis=1) * e / (k * t_B1)  # BE   (24) f_i
    p = (routing.scores * real_N[:, None]).reshape(batch, t, e).sum(axis=1) / t_B1  # (25) P_i
    expert_loss = jnp.sum(f * p, axis=-1)  # (23)

    f_dev = f.reshape(batch, g, -1).mean(axis=-1)  # BG   (27) f'_d
    p_dev = p.reshape(batch, g, -1).sum(axis=-1)  # BG   (28) P'_d
    device_loss = jnp.sum(f_dev * p_dev, axis=-1)  # (26)

    sent = chosen_BTE.reshape(batch, t, g, -1).max(axis=-1)  # BTG: token t reaches device d
    f_comm = sent.sum(axis=1) * g / (m * t_B1)  # (30) f''_d
    comm_loss = jnp.sum(f_comm * p_dev, axis=-1)  # (29), P''_d = P'_d (31)

    has_B = (real_N.reshape(batch, t).sum(axis=1) > 0).astype(jnp.float32)
    mean = lambda x_B: jnp.sum(x_B * has_B) / jnp.maximum(has_B.sum(), 1.0)  # noqa: E731
    return {
        "expert_loss": cfg.aux_loss_alpha1 * mean(expert_loss),
        "device_loss": cfg.aux_loss_alpha2 * mean(device_loss),
        "comm_loss": cfg.aux_loss_alpha3 * mean(comm_loss),
        "load": chosen.sum(axis=0) / jnp.maximum(chosen.sum(), 1.0),
    }


def reference_experts(x_ND, routing: Routing, w_gate_EDI, w_up_EDI, w_down_EID):
    """sum_k g_k * FFN_{e_k}(x), [N, D]: eq. (20)'s routed term read literally.

    Gathers each assignment's expert weights ([N, K, D, I]): memory grows with N * K, so this
    is the reference the tests hold the fast paths to, and the GPU's path only where the
    gather moves fewer bytes than reading every expert (`few_token_experts`).
    """
    e_NK = routing.experts
    h = jax.nn.silu(jnp.einsum("ND,NKDI->NKI", x_ND, w_gate_EDI[e_NK]))
    h = h * jnp.einsum("ND,NKDI->NKI", x_ND, w_up_EDI[e_NK])
    y_NKD = jnp.einsum("NKI,NKID->NKD", h, w_down_EID[e_NK])
    return jnp.einsum("NKD,NK->ND", y_NKD, routing.weights.astype(y_NKD.dtype))


def row_buckets(n: int) -> tuple[int, ...]:
    """The row counts an expert's tokens are gathered into at decode: 1, 2, 4, ... below n,
    then n, so that at most half of the rows an expert runs are padding."""
    caps, rows = [], 1
    while rows < n:
        caps.append(rows)
        rows *= 2
    return (*caps, n)


def per_expert_swiglu(cfg: ModelConfig, x_ND, routing: Routing, w_gate, w_up, w_down):
    """The same sum as `experts.routed_experts`, for few tokens (decode): a loop over the
    experts, each chosen one running its SwiGLU on the rows of the tokens that chose it.

    Only the chosen experts' weights are read, one copy each (a dot on XLA:CPU takes whole
    buffers): at decode sizes reading the weights is the cost, and one token reads K of the
    E experts. A batched matmul over every expert reads all E: about 6x slower at batch 1
    and 1.3x at batch 8 (`small`'s 7 MoE layers, A/B alternated on a shared 2-core CPU).
    An expert's rows are gathered into the smallest of `row_buckets(N)` that holds them
    (`lax.switch` over the buckets): at batch 8 an expert has 1-2 of the 8 tokens, and
    running all 8 rows made its dots compute-bound; the buckets took `small`'s routed
    experts at batch 8 from 2.59 to 2.13 ms a layer (A/B alternated on the shared CPU).
    """
    n, k = routing.experts.shape
    e = cfg.n_routed_experts
    caps = row_buckets(n)
    expert_A = routing.experts.reshape(-1)  # A = N K assignments, token-major
    order_A = jnp.argsort(expert_A, stable=True)  # grouped by expert, tokens ascending
    # Padded by the largest bucket so that every bucket's slice stays in range.
    token_A = jnp.concatenate([order_A // k, jnp.zeros(caps[-1], order_A.dtype)])
    gate_A = routing.weights.reshape(-1)[order_A].astype(x_ND.dtype)
    gate_A = jnp.concatenate([gate_A, jnp.zeros(caps[-1], x_ND.dtype)])
    count_E = jnp.zeros(e, jnp.int32).at[expert_A].add(1)
    start_E = jnp.cumsum(count_E) - count_E
    weights = (w_gate, w_up, w_down)

    def expert(i, y_ND):
        count, start = count_E[i], start_E[i]

        def run(rows: int, y_ND):
            token_R = jax.lax.dynamic_slice_in_dim(token_A, start, rows)
            gate_R = jax.lax.dynamic_slice_in_dim(gate_A, start, rows)
            gate_R = jnp.where(jnp.arange(rows) < count, gate_R, 0)  # the bucket's padding
            w1, w2, w3 = (jax.lax.dynamic_index_in_dim(w, i, keepdims=False) for w in weights)
            x_RD = x_ND[token_R]
            h_RI = jax.nn.silu(x_RD @ w1) * (x_RD @ w2)
            return y_ND.at[token_R].add((h_RI @ w3) * gate_R[:, None])

        bucket = jnp.searchsorted(jnp.array(caps), count)  # the first that holds `count`
        branches = [lambda y: y] + [functools.partial(run, rows) for rows in caps]
        return jax.lax.switch(jnp.where(count > 0, bucket + 1, 0), branches, y_ND)

    with jax.named_scope("experts"):
        return jax.lax.fori_loop(0, e, expert, jnp.zeros_like(x_ND))


def all_experts_swiglu(x_ND, routing: Routing, w_gate_EDI, w_up_EDI, w_down_EID):
    """The same sum, every expert run on every token and weighted by its gate (0 where not
    chosen): [N, D]. Reads each expert's weights once, in three plain batched matmuls."""
    n, e = x_ND.shape[0], w_gate_EDI.shape[0]
    gate_NE = jnp.zeros((n, e), jnp.float32)
    gate_NE = gate_NE.at[jnp.arange(n)[:, None], routing.experts].add(routing.weights)
    h_ENI = jax.nn.silu(jnp.einsum("ND,EDI->ENI", x_ND, w_gate_EDI))
    h_ENI = h_ENI * jnp.einsum("ND,EDI->ENI", x_ND, w_up_EDI)
    y_END = jnp.einsum("ENI,EID->END", h_ENI, w_down_EID)
    return jnp.einsum("END,NE->ND", y_END, gate_NE.astype(y_END.dtype))


# A GPU runs every expert on up to this many tokens (decode batches): reading the E experts'
# weights bounds the step until N ~ the chip's FLOP/byte ridge (~200 for bf16 on an H100/H200).
GPU_ALL_EXPERTS_TOKENS = 256


def few_token_experts(cfg: ModelConfig, x_ND, routing: Routing, w_gate, w_up, w_down):
    """The routed sum for decode-sized batches (few_tokens(cfg, N) holds), by platform.

    At decode reading the weights is the cost. The CPU loops over the chosen experts
    (`per_expert_swiglu`). On a GPU each loop iteration and branch is a round trip to the
    host (with the loop, a V2-Lite decode step at batch 1 took ~2 ms a layer on an H200,
    where reading its weights takes ~0.05 ms; not profiled further), so one program without
    control flow reads the fewest bytes it can: the chosen experts' weights gathered (read
    and written once each) while 2 N K < E, every expert's (read once) past that.
    """
    n, k = routing.experts.shape

    def cpu(x_ND, routing, *weights):
        if n * k <= cfg.n_routed_experts:
            return per_expert_swiglu(cfg, x_ND, routing, *weights)
        return routed_experts(x_ND, routing.experts, routing.weights, *weights, cfg.kernels)

    gpu = reference_experts if 2 * n * k < cfg.n_routed_experts else all_experts_swiglu
    args = (x_ND, routing, w_gate, w_up, w_down)
    return jax.lax.platform_dependent(*args, cuda=gpu, default=cpu)


def few_tokens(cfg: ModelConfig, n: int) -> bool:
    """Whether N tokens take `few_token_experts`: no more assignments than experts (the
    CPU's per-expert loop pays there), or few enough that a GPU reads every expert."""
    return n * cfg.num_experts_per_tok <= cfg.n_routed_experts or n <= GPU_ALL_EXPERTS_TOKENS


@struct.dataclass
class MoEAux:
    expert_loss: jnp.ndarray
    device_loss: jnp.ndarray
    comm_loss: jnp.ndarray
    load: jnp.ndarray  # [E]
    # Token dropping and fan-out (paper 2.2.2, 2.2.4), watched while training.
    drop_rate: jnp.ndarray  # share of the K x N assignments not computed
    never_drop_drop_rate: jnp.ndarray  # the same over never-drop tokens: must read 0
    fanout_mean: jnp.ndarray  # devices a token's rows reached (routing groups on one device)
    fanout_max: jnp.ndarray  # <= M under group_limited_greedy


def dispatch_stats(kept_NK, protected_N, fanout_N) -> dict[str, jnp.ndarray]:
    """Drop rates (overall and of never-drop tokens) and fan-out of one layer's dispatch."""
    kept = kept_NK.astype(jnp.float32)
    protected = protected_N.astype(jnp.float32)[:, None]
    protected_slots = jnp.maximum(protected.sum() * kept.shape[1], 1.0)
    fanout = fanout_N.astype(jnp.float32)
    return {
        "drop_rate": 1.0 - kept.mean(),
        "never_drop_drop_rate": ((1.0 - kept) * protected).sum() / protected_slots,
        "fanout_mean": fanout.mean(),
        "fanout_max": fanout.max(),
    }


class MoE(nn.Module):
    """Shared experts + routed experts: x [B, T, D] -> (y [B, T, D], MoEAux).

    With a `mesh`, the routed experts go through the expert-parallel all-to-all dispatch
    (`deepseek_jax.parallel.expert`); `train=True` (the train step's call) applies the
    device budget cfg.capacity_factor there, so tokens may be dropped. Without `train`, or
    without a mesh, nothing is dropped (paper 2.2.4: no dropping at evaluation).
    """

    cfg: ModelConfig
    mesh: Mesh | None = None
    train: bool = False

    @nn.compact
    def __call__(self, x_BTD: jnp.ndarray, token_mask_BT=None) -> tuple[jnp.ndarray, MoEAux]:
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

        x_BTD = constrain(x_BTD, self.mesh, ("batch", "length", "act_embed"))
        x_ND = x_BTD.reshape(b * t, d)
        never_drop = never_drop_tokens(cfg, b, t)
        if self.mesh is None:
            with jax.named_scope("router"):
                routing = route(cfg, x_ND, centroids)
            # The CPU's per-expert loop, against the grouped matmul, for `small` (E 32, K 4):
            # 2x faster at 1 token, 1.2x at 8, 1.2x slower at 16 and 2.4x at 64 (A/B
            # alternated on the shared CPU), so it takes N K <= E.
            if few_tokens(cfg, b * t):
                routed = few_token_experts(cfg, x_ND, routing, w_gate, w_up, w_down)
            else:
                routed = routed_experts(
                    x_ND, routing.experts, routing.weights, w_gate, w_up, w_down, cfg.kernels
                )
            group_NK = routing.experts // cfg.experts_per_group
            reached_NG = (group_NK[:, :, None] == jnp.arange(cfg.n_group)).any(axis=1)
            stats = dispatch_stats(
                jnp.ones_like(routing.experts, bool), never_drop, reached_NG.sum(1)
            )
        else:
            routed, routing, dispatch = expert_parallel(
                cfg,
                self.mesh,
                route,
                x_ND,
                never_drop,
                centroids,
                w_gate,
                w_up,
                w_down,
                drop=self.train,
            )
            stats = dispatch_stats(dispatch.kept, never_drop, dispatch.sent.sum(axis=1))
        y = routed.reshape(b, t, d)
        if cfg.n_shared_experts:
            y = y + MLP(cfg, cfg.n_shared_experts * i, name="shared")(x_BTD)
        mask_N = None if token_mask_BT is None else token_mask_BT.reshape(b * t)
        return y, MoEAux(**balance_losses(cfg, routing, b, mask_N), **stats)
