"""The planner's memory against the compiled train step, on 8 fake CPU devices.
`tests/test_plan.py` runs this file in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8."""

import jax
import pytest

import deepseek_jax as dj
from deepseek_jax.parallel import plan
from deepseek_jax.train.settings import OptimizerSettings

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/test_plan.py", allow_module_level=True)

# A V2 scaled down: MLA with a query latent, a dense first layer, 16 routed experts in 8
# groups on 4 expert devices, the train step's capacity factor 1.0.
CFG = dj.ModelConfig(
    vocab_size=512,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    intermediate_size=256,
    moe_intermediate_size=64,
    n_routed_experts=16,
    n_shared_experts=2,
    num_experts_per_tok=4,
    topk_method="group_limited_greedy",
    n_group=8,
    topk_group=2,
    first_k_dense_replace=1,
    max_position_embeddings=256,
    rope_scaling=None,
    capacity_factor=1.0,
)


@pytest.mark.parametrize("policy", ["full", "dots_with_no_batch_dims_saveable"])
def test_planned_train_memory_is_the_compiled_one(policy):
    """Per device: the planner's total from shapes (params, gradients, moments, activations
    under the policy, logits, batch) within 15% of the compiled train step's arguments +
    outputs + temporaries - aliased (the donated state), with activations a third or more of
    it, so that a wrong activation figure fails."""
    run = plan.Run(
        cfg=CFG.replace(remat_policy=policy),
        mesh=dj.make_mesh(data=2, expert=4),
        batch=32,
        length=128,
        micro_steps=2,
        optimizer=OptimizerSettings(),
    )
    planned = plan.train_memory(run)
    compiled = plan.compiled_train_memory(run)
    assert sum(plan.activation_memory(run).values()) > sum(planned.values()) / 3
    assert sum(planned.values()) == pytest.approx(compiled["total"], rel=0.15), (planned, compiled)
