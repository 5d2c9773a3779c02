"""Expert-parallel checks on 8 fake CPU devices. `tests/test_parallel.py` runs this file in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed
when jax starts, and the rest of the suite runs on one device)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deepseek_jax as dj
from deepseek_jax.model.layers import grouped_swiglu
from deepseek_jax.model.moe import route
from deepseek_jax.parallel import expert, rules

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/test_parallel.py", allow_module_level=True)

CFG = dj.ModelConfig(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    intermediate_size=128,
    moe_intermediate_size=32,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=4,
    topk_method="group_limited_greedy",
    n_group=8,
    topk_group=2,
    routed_scaling_factor=1.5,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    rope_scaling=None,
    initializer_range=0.1,
    aux_loss_alpha1=0.01,
    aux_loss_alpha2=0.05,
    aux_loss_alpha3=0.02,
)
MESHES = {
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
    "expert8": dict(expert=8),
}


@pytest.fixture(scope="module")
def setup():
    params = jax.jit(dj.init_params, static_argnums=0)(CFG, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 8))
    return params, tokens


def loss_fn(cfg, mesh):
    def loss(params, tokens):
        out = dj.DeepSeekV2(cfg, mesh=mesh).apply({"params": params}, tokens)
        return jnp.mean(out.logits**2) + out.aux.total, out

    return loss


def sharded(mesh, params, tokens):
    return dj.shard_params(CFG, params, mesh), jax.device_put(tokens, rules.batch_sharding(mesh))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_dropless_forward_matches_single_device(setup, name):
    params, tokens = setup
    mesh = dj.make_mesh(**MESHES[name])
    plain = dj.DeepSeekV2(CFG).apply({"params": params}, tokens)
    forward = jax.jit(lambda p, t: dj.DeepSeekV2(CFG, mesh=mesh).apply({"params": p}, t))
    out = forward(*sharded(mesh, params, tokens))
    np.testing.assert_allclose(out.logits, plain.logits, atol=1e-5, rtol=0)
    for field in ("expert_loss", "device_loss", "comm_loss", "load"):
        np.testing.assert_allclose(
            getattr(out.aux, field), getattr(plain.aux, field), atol=1e-6, rtol=1e-6
        )


def test_hlo_has_all_to_all_and_grads_match(setup):
    params, tokens = setup
    mesh = dj.make_mesh(data=2, expert=4)
    args = sharded(mesh, params, tokens)
    forward = jax.jit(lambda p, t: loss_fn(CFG, mesh)(p, t)[0])
    grad = jax.jit(jax.value_and_grad(lambda p, t: loss_fn(CFG, mesh)(p, t)[0]))
    assert "all-to-all" in forward.lower(*args).compile().as_text()
    compiled = grad.lower(*args).compile()
    assert "all-to-all" in compiled.as_text()
    value, grads = compiled(*args)
    plain = jax.jit(jax.value_and_grad(lambda p: loss_fn(CFG, None)(p, tokens)[0]))
    plain_value, plain_grads = plain(params)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, plain_grads)


def moe_inputs(cfg, seed, n=256, bias_device=None):
    """Tokens [n, D] and one MoE layer's weights; bias_device skews the router toward it."""
    keys = jax.random.split(jax.random.key(seed), 6)
    d, e, i = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    x = jax.random.normal(keys[0], (n, d))
    centroids = jax.random.normal(keys[1], (d, e))
    if bias_device is not None:
        # A shared direction in every token, aligned with one device's experts.
        shared = jax.random.normal(keys[2], (d,))
        x = x + 2.0 * shared
        per_device = e // 8
        columns = slice(bias_device * per_device, (bias_device + 1) * per_device)
        centroids = centroids.at[:, columns].add(0.3 * shared[:, None])
    w = [
        jax.random.normal(k, s) * 0.1
        for k, s in zip(keys[3:], [(e, d, i)] * 2 + [(e, i, d)], strict=True)
    ]
    return x, centroids, *w


def run_expert_parallel(cfg, mesh, x, never_drop, centroids, *w):
    fn = jax.jit(lambda *a: expert.expert_parallel(cfg, mesh, route, a[0], never_drop, *a[1:]))
    return fn(x, centroids, *w)


def test_a_token_reaches_at_most_m_devices():
    mesh = dj.make_mesh(expert=8)
    x, centroids, *w = moe_inputs(CFG, 1)
    never_drop = np.zeros(x.shape[0], bool)
    counts = {}
    for method in ("group_limited_greedy", "greedy"):
        cfg = CFG.replace(topk_method=method)
        _, _, dispatch = run_expert_parallel(cfg, mesh, x, never_drop, centroids, *w)
        counts[method] = np.asarray(dispatch.sent).sum(axis=1)  # devices each token reached
    assert counts["group_limited_greedy"].max() <= CFG.topk_group
    assert (counts["greedy"] > CFG.topk_group).any()


def test_capacity_drops_lowest_affinity_and_spares_never_drop_tokens():
    mesh = dj.make_mesh(expert=8)
    cfg = CFG.replace(capacity_factor=1.0)
    x, centroids, *w = moe_inputs(cfg, 2, bias_device=3)
    n = x.shape[0]
    # 64 sequences of 4 tokens: each device holds 8 sequences, 2 of them never dropped.
    never_drop = expert.never_drop_tokens(cfg.replace(no_drop_fraction=0.25), 64, 4)
    y, routing, dispatch = run_expert_parallel(cfg, mesh, x, never_drop, centroids, *w)
    wanted, sent = np.asarray(dispatch.wanted), np.asarray(dispatch.sent)
    affinity = np.asarray(dispatch.affinity)
    assert (sent <= wanted).all()
    dropped = wanted & ~sent
    assert dropped.sum() > 0, "the skewed router should overflow device 3"
    assert not (dropped & never_drop[:, None]).any()
    # Per source device (its n/8 tokens) and destination: every dropped row ranks below
    # every kept row that is not a never-drop one.
    for src in range(8):
        rows = slice(src * n // 8, (src + 1) * n // 8)
        for dst in range(8):
            kept = affinity[rows, dst][sent[rows, dst] & ~never_drop[rows]]
            lost = affinity[rows, dst][dropped[rows, dst]]
            if len(kept) and len(lost):
                assert lost.max() <= kept.min()
    # The output is the plain dispatch without the dropped rows' assignments.
    experts = np.asarray(routing.experts)
    device = experts // (cfg.n_routed_experts // 8)
    kept_nk = np.take_along_axis(sent, device, axis=1)
    expected = grouped_swiglu(x, routing.experts, routing.weights * kept_nk, *w)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_mesh_and_rules_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        dj.make_mesh(data=2, expert=8)
    with pytest.raises(ValueError, match="both map to mesh axis 'fsdp'"):
        rules.spec(("batch", "embed"))
    with pytest.raises(ValueError, match="n_group must be a multiple"):
        expert.expert_devices(CFG.replace(n_group=4, topk_group=2), dj.make_mesh(expert=8))


def test_generate_on_the_mesh_matches_single_device(setup):
    """Greedy generation with params sharded on (data 2, expert 4): the same tokens as on one
    device, with the batch split (8 rows) and padded to the mesh (3 rows -> 8)."""
    params, tokens = setup
    mesh = dj.make_mesh(**MESHES["data2_expert4"])
    placed = dj.shard_params(CFG, params, mesh)
    for prompts in (tokens[:, :5], tokens[:3, :4]):
        plain = dj.generate(CFG, params, prompts, max_new_tokens=6)
        sharded = dj.generate(CFG, placed, prompts, max_new_tokens=6, mesh=mesh)
        np.testing.assert_array_equal(sharded, plain)
