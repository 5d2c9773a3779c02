"""Expert parallelism and the sharding rules on 8 fake CPU devices.

The device count is fixed when jax starts and this pytest process has one device, so the
checks live in `tests/parallel_cases.py` and run here in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8:
  - the dropless sharded forward (logits and balance losses) equals the single-device one
    on meshes (data 2, expert 4), (fsdp 2, expert 2, tensor 2) and (expert 8);
  - the compiled forward and value_and_grad contain all-to-all, and the sharded loss and
    grads equal the single-device ones;
  - counted from the dispatch, group_limited_greedy sends no token to more than M devices,
    greedy routing on the same inputs does;
  - at capacity factor 1.0 with a skewed router, dropped rows are the lowest-affinity ones,
    never-drop sequences lose none, and the output is the plain path minus the dropped rows;
  - mesh and rules errors (too few devices, two logical axes on one mesh axis, n_group);
  - greedy generation on a (data 2, expert 4) mesh gives the single-device tokens.
"""

import jax
import optax
import pytest
from eight_devices import run_cases
from jax.sharding import PartitionSpec as P

import deepseek_jax as dj
from deepseek_jax.parallel import rules


def test_expert_parallel_on_eight_devices():
    run_cases("tests/parallel_cases.py", expected_passed=8)


def test_every_param_has_a_rule_and_experts_split_on_expert():
    specs = rules.param_specs(dj.preset("v2"))
    moe = specs["moe_layers"]["mlp"]
    assert moe["w_gate"] == P(None, "expert", "fsdp", "tensor")
    assert moe["w_down"] == P(None, "expert", "tensor", "fsdp")
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")


def test_opt_state_mirrors_params():
    cfg = dj.preset("tiny")
    mesh = dj.make_mesh()
    shapes = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))
    state = jax.eval_shape(optax.adamw(1e-3).init, shapes)
    shardings = rules.opt_state_shardings(cfg, mesh, state)
    assert shardings[0].mu == rules.param_shardings(cfg, mesh)
    assert shardings[0].count.spec == P()


def test_two_logical_axes_on_one_mesh_axis_are_refused():
    with pytest.raises(ValueError, match="both map to mesh axis"):
        rules.spec(("batch", "embed"))


def test_moments_split_over_the_token_axes_their_param_leaves_free():
    sizes = {"data": 2, "fsdp": 4, "expert": 8, "tensor": 1}
    # V2's w_up [L, E, D, I] is split on expert and fsdp; "data" takes the largest shard, I.
    w_up = rules.zero1_spec((59, 160, 5120, 1536), P(None, "expert", "fsdp", "tensor"), sizes)
    assert w_up == P(None, "expert", "fsdp", ("tensor", "data"))
    # w_uq [L, q_lora, H, head_dim] is split on nothing but tensor: all three token axes.
    w_uq = rules.zero1_spec((59, 1536, 128, 128), P(None, None, "tensor", None), sizes)
    assert w_uq == P(None, ("data", "fsdp", "expert"), "tensor", None)
