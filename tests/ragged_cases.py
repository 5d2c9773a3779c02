"""The ragged expert-parallel dispatch (parallel/ragged.py) on 8 fake CPU devices.
`tests/test_ragged.py` runs this file in a subprocess with 8 devices.

XLA:CPU cannot run ragged_all_to_all, so the dispatch runs here with `dispatch="emulated"`
(the same offsets and sizes, the collective done densely), the emulation is held to the
collective's documented semantics, and the TPU program's buffers are read from its export.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from parallel_cases import CFG, moe_inputs, run_expert_parallel, scaled_v2

import deepseek_jax as dj
from deepseek_jax.errors import UserError
from deepseek_jax.model.moe import Routing, reference_experts
from deepseek_jax.parallel import expert, plan, ragged

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/test_ragged.py", allow_module_level=True)


def test_emulation_follows_the_documented_semantics():
    """jax.lax.ragged_all_to_all's docstring, as a loop over devices in numpy: device s sends
    operand[in_off[r] : in_off[r] + size[r]] to r, written at out_off[r] in r's output."""
    p, rows, out_rows = 8, 24, 40
    rng = np.random.RandomState(0)
    sizes = rng.randint(0, 4, (p, p))  # [sender, receiver]
    sizes[2, 5] = 0  # an empty slice
    in_off = np.cumsum(sizes, axis=1) - sizes  # packed by receiver, no gaps
    out_off = np.cumsum(sizes, axis=0) - sizes + 3  # packed by sender, after 3 untouched rows
    operand = rng.randn(p, rows, 2).astype(np.float32)
    output = rng.randn(p, out_rows, 2).astype(np.float32)
    want = output.copy()
    for s in range(p):
        for r in range(p):
            part = operand[s, in_off[s, r] : in_off[s, r] + sizes[s, r]]
            want[r, out_off[s, r] : out_off[s, r] + sizes[s, r]] = part

    mesh = dj.make_mesh(expert=8)

    def one_device(operand, output, in_off, send, out_off, recv):
        out = ragged.emulated_all_to_all(
            operand[0], output[0], in_off[0], send[0], out_off[0], recv[0], axis_name="expert"
        )
        return out[None]

    spec = P("expert")
    got = jax.jit(jax.shard_map(one_device, mesh=mesh, in_specs=spec, out_specs=spec))(
        operand, output, in_off, sizes, out_off, sizes.T
    )
    np.testing.assert_array_equal(got, want)


def test_allowances_fill_a_receiver_never_drop_rows_first():
    count = jnp.array([[10, 0], [30, 4]])
    protected = jnp.array([[6, 0], [0, 0]])
    allow = ragged.allowances(count, protected, room=20)
    # Receiver 0: 6 never-drop rows, then 14 shared 4 : 30 by what each sender has left.
    np.testing.assert_array_equal(allow, [[6 + 1, 0], [12, 4]])
    assert int(allow[:, 0].sum()) <= 20


@pytest.mark.parametrize("drop", [False, True])
def test_ragged_dispatch_keeps_the_budget_and_the_never_drop_rows(drop):
    """The budget test of parallel_cases, through the emulated ragged dispatch: at cf 1.0
    with a router skewed toward device 3, the kept assignments equal the reference experts,
    never-drop tokens lose nothing, and dropless keeps everything."""
    mesh = dj.make_mesh(expert=8)
    cfg = CFG.replace(capacity_factor=1.0, dispatch="emulated")
    x, centroids, *w = moe_inputs(cfg, 2, bias_device=3)
    never_drop = expert.never_drop_tokens(cfg.replace(no_drop_fraction=0.25), 64, 4)
    y, routing, dispatch = run_expert_parallel(cfg, mesh, x, never_drop, centroids, *w, drop=drop)
    kept = np.asarray(dispatch.kept)
    assert not (~kept & never_drop[:, None]).any(), "a never-drop assignment was dropped"
    if drop:
        assert (~kept).sum() > 0.2 * kept.size, "the skewed router should overflow device 3"
    else:
        assert kept.all()
    kept_routing = Routing(routing.scores, routing.experts, routing.weights * kept)
    np.testing.assert_allclose(y, reference_experts(x, kept_routing, *w), atol=1e-5)


def test_ragged_dispatch_gradients_equal_one_device():
    """The whole model, dropless, on (data 2, expert 4): loss and gradients through the
    emulated ragged dispatch equal the single-device model's."""
    params = jax.jit(dj.init_params, static_argnums=0)(CFG, jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, CFG.vocab_size, (8, 8))
    mesh = dj.make_mesh(data=2, expert=4)
    cfg = CFG.replace(dispatch="emulated")

    def loss(cfg, mesh):
        def fn(params):
            out = dj.DeepSeekV2(cfg, mesh=mesh).apply({"params": params}, tokens)
            return jnp.mean(out.logits**2) + out.aux.total

        return jax.jit(jax.value_and_grad(fn))

    value, grads = loss(cfg, mesh)(dj.shard_params(cfg, params, mesh))
    plain_value, plain_grads = loss(CFG, None)(params)
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, plain_grads)


def test_one_sequence_a_device_ships_the_expectation_not_the_worst_case():
    """V2's layout: one sequence a device, the never-drop one on one device. The dense
    all_to_all must give every pair room for all its never-drop tokens (the worst case); the
    ragged dispatch exported for TPU receives within 1.3x of 2 cf M D x 4 bytes a token,
    the planner within 10% of it, and (emulated) never drops a never-drop token."""
    mesh = dj.make_mesh(expert=8)
    batch, length = 8, 64
    cfg = scaled_v2()
    m, d = expert.devices_per_token(cfg, 8), cfg.hidden_size
    ideal = 2 * m * d * 4
    exported = plan.exported_layer_cost(cfg, mesh, batch, length, drop=True)
    assert exported["activation bytes"] <= 1.3 * ideal, exported
    predicted = plan.predicted_layer_cost(cfg, mesh, batch, length, drop=True, ragged=True)
    for key in exported:
        assert predicted[key] == pytest.approx(exported[key], rel=0.1), key
    dense = plan.predicted_layer_cost(cfg, mesh, batch, length, drop=True)
    assert dense["activation bytes"] > 2 * ideal

    x, centroids, *w = moe_inputs(cfg, 3, n=batch * length)
    never_drop = expert.never_drop_tokens(cfg, batch, length)
    assert never_drop.reshape(8, -1).any(axis=1).sum() == 1  # one device holds them all
    emulated = cfg.replace(dispatch="emulated")
    y, routing, dispatch = run_expert_parallel(
        emulated, mesh, x, never_drop, centroids, *w, drop=True
    )
    kept = np.asarray(dispatch.kept)
    assert not (~kept & never_drop[:, None]).any()
    assert np.asarray(dispatch.sent).sum(axis=1).max() <= m
    kept_routing = Routing(routing.scores, routing.experts, routing.weights * kept)
    np.testing.assert_allclose(y, reference_experts(x, kept_routing, *w), atol=1e-4)


def test_forced_ragged_on_the_cpu_fails_in_one_line():
    mesh = dj.make_mesh(expert=8)
    cfg = CFG.replace(dispatch="ragged")
    x, centroids, *w = moe_inputs(cfg, 1)
    with pytest.raises(UserError, match="dispatch='ragged' cannot run on the cpu") as err:
        run_expert_parallel(cfg, mesh, x, np.zeros(x.shape[0], bool), centroids, *w)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="dispatch='sparse'"):
        CFG.replace(dispatch="sparse")
