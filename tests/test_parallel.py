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
  - the device budget (paper 2.2.4) at cf 1.0 with a skewed router: at most cf K n
    assignments a device, the dropped ones the lowest-affinity of all it received,
    never-drop tokens intact, the output the reference dispatch minus the dropped ones;
  - the compiled all-to-all bytes and expert FLOPs of a scaled V2 layer against the paper's
    budget and against the planner;
  - generation is dropless whatever capacity_factor says; train=True drops;
  - bad inputs fail in one line; ZeRO-1 moments on a real 3-axis mesh;
  - greedy generation on a (data 2, expert 4) mesh gives the single-device tokens.
"""

import pytest
from eight_devices import run_cases
from jax.sharding import PartitionSpec as P

import deepseek_jax as dj
from deepseek_jax.parallel import expert, placement, rules


def test_expert_parallel_on_eight_devices():
    run_cases("tests/parallel_cases.py", expected_passed=12)


def test_every_param_has_a_rule_and_experts_split_on_expert():
    specs = placement.param_specs(dj.preset("v2"))
    moe = specs["moe_layers"]["mlp"]
    assert moe["w_gate"] == P(None, "expert", "fsdp", "tensor")
    assert moe["w_down"] == P(None, "expert", "tensor", "fsdp")
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")


def test_expert_parallel_specs_follow_the_rules_table(monkeypatch):
    """Change a rule and the dispatch's shard_map specs follow: nothing is hard-coded."""
    rows, experts_in, experts_out = expert.dispatch_specs()
    assert rows == P(("data", "fsdp", "expert"))
    assert experts_in == P("expert", None, "tensor")
    assert experts_out == P("expert", "tensor", None)
    monkeypatch.setitem(rules.TABLE, "expert_mlp", ())
    monkeypatch.setitem(rules.TABLE, "batch", ("data", "expert"))
    rows, experts_in, experts_out = expert.dispatch_specs()
    assert rows == P(("data", "expert"))
    assert experts_in == P("expert", None, None)
    assert experts_out == P("expert", None, None)
    assert rules.token_devices(dj.make_mesh()) == 1


def test_two_logical_axes_on_one_mesh_axis_are_refused():
    with pytest.raises(ValueError, match="both map to mesh axis"):
        rules.spec(("batch", "embed"))


def test_moments_split_over_the_token_axes_their_param_leaves_free():
    sizes = {"data": 2, "fsdp": 4, "expert": 8, "tensor": 1}
    # V2's w_up [L, E, D, I] is split on expert and fsdp; "data" takes the largest shard, I.
    w_up = placement.zero1_spec((59, 160, 5120, 1536), P(None, "expert", "fsdp", "tensor"), sizes)
    assert w_up == P(None, "expert", "fsdp", ("tensor", "data"))
    # w_uq [L, q_lora, H, head_dim] is split on nothing but tensor: all three token axes.
    w_uq = placement.zero1_spec((59, 1536, 128, 128), P(None, None, "tensor", None), sizes)
    assert w_uq == P(None, ("data", "fsdp", "expert"), "tensor", None)


def test_capacity_factor_must_be_positive_in_one_line():
    with pytest.raises(ValueError, match="capacity_factor=0") as err:
        dj.ModelConfig(capacity_factor=0.0)
    assert "\n" not in str(err.value)
