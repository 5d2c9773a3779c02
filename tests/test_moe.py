"""DeepSeekMoE: the router and the MoE layer against transformers' DeepseekV2TopkRouter and
DeepseekV2Moe on the same weights, and the balance losses against the paper's formulas (2.2.3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_models import GROUP_LIMITED, build_hf

import deepseek_jax as dj
from deepseek_jax.model.experts import grouped_matmul, routed_experts, tile_rows
from deepseek_jax.model.moe import (
    GPU_ALL_EXPERTS_TOKENS,
    MoE,
    Routing,
    all_experts_swiglu,
    balance_losses,
    few_token_experts,
    few_tokens,
    per_expert_swiglu,
    reference_experts,
    route,
    row_buckets,
)
from deepseek_jax.parallel import hlo

VARIANTS = {
    "greedy": dict(routed_scaling_factor=1.5),
    "group_limited": GROUP_LIMITED,
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def models(request, tmp_path_factory):
    """(HF model, our cfg, our params of the one MoE layer) for a 2-layer model (dense, MoE)."""
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = build_hf(directory, num_hidden_layers=2, **VARIANTS[request.param])
    cfg, params = dj.load_hf(directory)
    moe_params = jax.tree.map(lambda a: a[0], params["moe_layers"]["mlp"])
    return hf_model, cfg, moe_params


def tokens(cfg, n=256, seed=0):
    """[N, D] float32 inputs, at about the scale of a normed hidden state."""
    return np.random.RandomState(seed).randn(n, cfg.hidden_size).astype(np.float32)


def by_expert(experts_NK, weights_NK):
    """Sorts each token's (expert, weight) pairs by expert: HF's top-k order is unspecified."""
    order = np.argsort(experts_NK, axis=1)
    return np.take_along_axis(experts_NK, order, 1), np.take_along_axis(weights_NK, order, 1)


def test_router_matches_hf(models):
    hf_model, cfg, moe_params = models
    x = tokens(cfg)
    with torch.no_grad():
        _, hf_weights, hf_experts = hf_model.model.layers[1].mlp.gate(torch.from_numpy(x))
    routing = route(cfg, x, moe_params["centroids"])
    ours_e, ours_w = by_expert(np.asarray(routing.experts), np.asarray(routing.weights))
    hf_e, hf_w = by_expert(hf_experts.numpy(), hf_weights.numpy())
    np.testing.assert_array_equal(ours_e, hf_e)
    np.testing.assert_allclose(ours_w, hf_w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("models", ["group_limited"], indirect=True)
def test_group_limit_changes_routing(models):
    """Group-limited routing is not secretly greedy, and never reaches more than M groups."""
    _, cfg, moe_params = models
    x = tokens(cfg, seed=2)
    limited = np.sort(np.asarray(route(cfg, x, moe_params["centroids"]).experts), axis=1)
    greedy_cfg = cfg.replace(topk_method="greedy")
    greedy = np.sort(np.asarray(route(greedy_cfg, x, moe_params["centroids"]).experts), axis=1)
    assert (limited != greedy).any(axis=1).mean() > 0.05
    groups = limited // cfg.experts_per_group
    assert max(len(set(row)) for row in groups) <= cfg.topk_group


# 2 x 40 tokens take the tiled grouped matmul, 2 x 1 the per-expert loop (decode sizes).
@pytest.mark.parametrize("t", [40, 1])
def test_moe_layer_matches_hf(models, t):
    hf_model, cfg, moe_params = models
    x = tokens(cfg, n=2 * t, seed=1).reshape(2, t, -1)
    with torch.no_grad():
        expected = hf_model.model.layers[1].mlp(torch.from_numpy(x)).numpy()
    ours, aux = MoE(cfg).apply({"params": moe_params}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(aux.load.sum()), 1.0, rtol=1e-6)


def test_norm_topk_prob_renormalises(models):
    """With norm_topk_prob the K weights of a token sum to routed_scaling_factor, same experts."""
    _, cfg, moe_params = models
    x = tokens(cfg, n=64, seed=3)
    plain = route(cfg, x, moe_params["centroids"])
    normed = route(cfg.replace(norm_topk_prob=True), x, moe_params["centroids"])
    np.testing.assert_array_equal(np.asarray(normed.experts), np.asarray(plain.experts))
    np.testing.assert_allclose(
        np.asarray(normed.weights.sum(-1)), cfg.routed_scaling_factor, rtol=1e-6
    )
    expected = plain.weights / plain.weights.sum(-1, keepdims=True) * cfg.routed_scaling_factor
    np.testing.assert_allclose(np.asarray(normed.weights), np.asarray(expected), rtol=1e-6)


def paper_losses(cfg, scores_BTE, experts_BTK):
    """Paper 2.2.3 eqs (12)-(19), loop by loop, per sequence, averaged over the batch."""
    e, k, g, m = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.groups_per_token
    per_group = e // g
    losses = []
    for scores, experts in zip(scores_BTE, experts_BTK, strict=True):
        t = len(scores)
        f = np.array([e / (k * t) * sum(i in row for row in experts) for i in range(e)])
        p = scores.mean(axis=0)
        f_dev = np.array([f[d * per_group : (d + 1) * per_group].mean() for d in range(g)])
        p_dev = np.array([p[d * per_group : (d + 1) * per_group].sum() for d in range(g)])
        sent = [sum(any(j // per_group == d for j in row) for row in experts) for d in range(g)]
        f_comm = g / (m * t) * np.array(sent)
        losses.append([f @ p, f_dev @ p_dev, f_comm @ p_dev])
    alphas = np.array([cfg.aux_loss_alpha1, cfg.aux_loss_alpha2, cfg.aux_loss_alpha3])
    return alphas * np.mean(losses, axis=0)


def test_balance_losses_match_paper(models):
    _, cfg, moe_params = models
    cfg = cfg.replace(aux_loss_alpha1=0.003, aux_loss_alpha2=0.05, aux_loss_alpha3=0.02)
    b, t = 3, 16
    x = tokens(cfg, n=b * t, seed=4)
    routing = route(cfg, x, moe_params["centroids"])
    ours = balance_losses(cfg, routing, b)
    expected = paper_losses(
        cfg,
        np.asarray(routing.scores).reshape(b, t, -1),
        np.asarray(routing.experts).reshape(b, t, -1),
    )
    got = [float(ours[name]) for name in ("expert_loss", "device_loss", "comm_loss")]
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_uniform_router_losses(models):
    """P_i = 1/E makes L_exp = alpha1 and L_dev = alpha2 whatever is chosen: sum_i f_i = E and
    sum_d f'_d = G by construction. L_com = alpha3 * (mean devices reached per token) / M, so
    alpha3 exactly when every token reaches M devices. Here T = E tokens and token t takes
    experts t .. t+K-1 (mod E): each expert is chosen K times, f_i = 1, the balanced load."""
    _, cfg, _ = models
    cfg = cfg.replace(aux_loss_alpha1=0.003, aux_loss_alpha2=0.05, aux_loss_alpha3=0.02)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    experts = (np.arange(e)[:, None] + np.arange(k)) % e  # [T=E, K]
    routing = Routing(
        scores=jnp.full((e, e), 1.0 / e),
        experts=jnp.asarray(experts, jnp.int32),
        weights=jnp.full((e, k), 1.0 / e),
    )
    losses = balance_losses(cfg, routing, batch=1)
    assert float(losses["expert_loss"]) == pytest.approx(cfg.aux_loss_alpha1, rel=1e-6)
    assert float(losses["device_loss"]) == pytest.approx(cfg.aux_loss_alpha2, rel=1e-6)
    reached = np.mean([len(set(row // cfg.experts_per_group)) for row in experts])
    expected_comm = cfg.aux_loss_alpha3 * reached / cfg.groups_per_token
    assert float(losses["comm_loss"]) == pytest.approx(expected_comm, rel=1e-6)
    np.testing.assert_allclose(np.asarray(losses["load"]), 1.0 / e, rtol=1e-6)


def test_grouped_matmul_is_ragged_dot_forward_and_backward():
    """The CPU grouped matmul against lax.ragged_dot (its interface), values and gradients,
    with an empty group, a group smaller than a tile, and rows past sum(group_sizes)."""
    rng = np.random.RandomState(0)
    lhs = jnp.asarray(rng.randn(300, 16), jnp.float32)
    rhs = jnp.asarray(rng.randn(5, 16, 24), jnp.float32)
    sizes = jnp.array([50, 0, 100, 3, 117])  # 270 rows in groups, 30 past them
    cot = jnp.asarray(rng.randn(300, 24), jnp.float32)

    def ours(lhs, rhs):
        return grouped_matmul(lhs, rhs, sizes, 16)

    def theirs(lhs, rhs):
        return jnp.pad(jax.lax.ragged_dot(lhs[:270], rhs, sizes), ((0, 30), (0, 0)))

    np.testing.assert_allclose(ours(lhs, rhs), theirs(lhs, rhs), atol=1e-5)
    grads = [
        jax.grad(lambda a, b, f=f: jnp.sum(f(a, b) * cot), argnums=(0, 1))(lhs, rhs)
        for f in (ours, theirs)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def expert_weights(cfg, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    shapes = [(e, d, i), (e, d, i), (e, i, d)]
    return [jax.random.normal(k, s) * 0.1 for k, s in zip(keys, shapes, strict=True)]


@pytest.mark.parametrize("models", ["group_limited"], indirect=True)
def test_fast_dispatch_matches_the_reference_values_and_gradients(models):
    """routed_experts (grouped matmul) = reference_experts (a gather per assignment), in the
    output and in the gradients of x, gates and the three expert matrices; an expert id E
    (empty slot, out of range rather than a wrapping -1) contributes nothing."""
    _, cfg, moe_params = models
    x = jnp.asarray(tokens(cfg, n=96, seed=5))
    routing = route(cfg, x, moe_params["centroids"])
    w = expert_weights(cfg)
    empty = jnp.zeros_like(routing.experts).at[::7, 0].set(cfg.n_routed_experts)
    experts = jnp.where(empty > 0, empty, routing.experts)

    def fast(x, gates, *w):
        return routed_experts(x, experts, gates, *w)

    def reference(x, gates, *w):
        gates = jnp.where(experts < cfg.n_routed_experts, gates, 0.0)
        kept = Routing(routing.scores, jnp.minimum(experts, cfg.n_routed_experts - 1), gates)
        return reference_experts(x, kept, *w)

    args = (x, routing.weights, *w)
    np.testing.assert_allclose(fast(*args), reference(*args), atol=1e-5)
    cot = jnp.asarray(np.random.RandomState(6).randn(*x.shape), jnp.float32)
    grads = [
        jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=tuple(range(5)))(*args)
        for f in (fast, reference)
    ]
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("experts", [16, 64])
def test_expert_work_is_proportional_to_the_assignments(experts):
    """Compiled FLOPs of the routed experts, forward and backward (loop bodies times their
    trip counts): within 1.15x of 6 (forward) and 18 (with backward) x D x I per assignment,
    whatever the number of experts (the tiles are sized by the assignments, not per expert
    worst case, and no weight copy per tile is multiplied)."""
    n, k, d, i = 1024, 4, 64, 32
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    ids = jax.ShapeDtypeStruct((n, k), jnp.int32)
    gates = jax.ShapeDtypeStruct((n, k), jnp.float32)
    w_in = jax.ShapeDtypeStruct((experts, d, i), jnp.float32)
    w_out = jax.ShapeDtypeStruct((experts, i, d), jnp.float32)
    args = (x, ids, gates, w_in, w_in, w_out)
    useful = 6 * n * k * d * i
    forward = jax.jit(routed_experts).lower(*args).compile().as_text()
    assert useful <= hlo.dot_flops(forward, "experts") <= 1.15 * useful
    loss = jax.grad(lambda *a: routed_experts(*a).sum(), argnums=(0, 3, 4, 5))
    backward = jax.jit(loss).lower(*args).compile().as_text()
    assert 3 * useful <= hlo.dot_flops(backward, "experts") <= 1.15 * 3 * useful
    assert tile_rows(n * k, experts) >= 8


@pytest.mark.parametrize("models", ["group_limited"], indirect=True)
def test_per_expert_loop_matches_the_reference(models):
    """The decode path (`per_expert_swiglu`: each chosen expert on its own tokens' rows,
    gathered into row buckets of 1, 2, 4 or 5 for N = 5) = reference_experts, with experts
    chosen by 5, 4, 3, 2 and 1 of the tokens, so that every bucket runs."""
    _, cfg, moe_params = models
    x = jnp.asarray(tokens(cfg, n=5, seed=7))
    experts = jnp.array([[3, 5, 7], [3, 5, 7], [3, 5, 7], [3, 5, 8], [3, 8, 9]], jnp.int32)
    gates = jnp.asarray(np.random.RandomState(8).uniform(0.1, 1.0, experts.shape), jnp.float32)
    routing = Routing(jnp.zeros((5, cfg.n_routed_experts)), experts, gates)
    w = expert_weights(cfg)
    assert row_buckets(5) == (1, 2, 4, 5)
    np.testing.assert_allclose(
        per_expert_swiglu(cfg, x, routing, *w), reference_experts(x, routing, *w), atol=1e-5
    )


@pytest.mark.parametrize("models", ["group_limited"], indirect=True)
def test_gpu_decode_paths_match_the_reference_without_control_flow(models):
    """The GPU's decode-sized paths (`few_token_experts`: the chosen experts gathered, or
    every expert weighted by its gate) = reference_experts; lowered for cuda, the routed sum
    has no loop (each iteration is a round trip to the host on a GPU), where the CPU's has."""
    _, cfg, moe_params = models
    w = expert_weights(cfg)
    for n in (1, 5, 40):
        x = jnp.asarray(tokens(cfg, n=n, seed=n))
        routing = route(cfg, x, moe_params["centroids"])
        want = reference_experts(x, routing, *w)
        np.testing.assert_allclose(all_experts_swiglu(x, routing, *w), want, atol=1e-5)
        assert few_tokens(cfg, n)
        lowered = {
            platform: jax.export.export(
                jax.jit(lambda x, r: few_token_experts(cfg, x, r, *w)), platforms=[platform]
            )(x, routing).mlir_module()
            for platform in ("cuda", "cpu")
        }
        assert "stablehlo.while" not in lowered["cuda"]
        assert "stablehlo.while" in lowered["cpu"]  # the per-expert loop, or the tiled matmul
        np.testing.assert_allclose(few_token_experts(cfg, x, routing, *w), want, atol=1e-5)
    assert not few_tokens(cfg, GPU_ALL_EXPERTS_TOKENS + 1)
