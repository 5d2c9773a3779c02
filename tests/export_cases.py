"""The V2-Lite-shaped train step, prefill and decode step, exported for TPU and GPU from this
CPU host on 16 fake devices with expert parallelism. `tests/test_export.py` runs this file in
a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=16.

Real widths (D 2048, 16 heads of 192/128, r_kv 512, 64 experts of 1408, vocab 102400), two
layers (one dense, one MoE), the default compute dtype resolved for TPU (bf16 compute, fp32
master params): nothing is allocated, the
programs are only lowered (`jax.export`), once per platform (a Pallas TPU call inside
`platform_dependent` cannot be lowered into one module for both: JAX lowers it for each).
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax import export

import deepseek_jax as dj
from deepseek_jax.generate.loop import decode_step, prefill
from deepseek_jax.model.transformer import init_cache, unstack_params
from deepseek_jax.parallel import placement, rules
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.settings import OptimizerSettings
from deepseek_jax.train.state import init_state

if jax.device_count() != 16:
    pytest.skip("needs 16 devices: run through tests/test_export.py", allow_module_level=True)

# The default compute dtype ("auto") resolved for the TPU from this CPU host: bf16 compute,
# fp32 master params (the explicit platform is how an export reaches the accelerator choice).
CFG = dj.config.resolve_dtype(
    dj.config.v2_lite().replace(
        num_hidden_layers=2, remat_policy="dots_with_no_batch_dims_saveable"
    ),
    "tpu",
)
# No "tensor" axis: V2-Lite's expert width 1408 = 11 x 128 split in two is not a whole number
# of megablox's 128-wide tiles (that layout takes the plain path, tested in test_kernels.py).
MESH = dict(data=2, fsdp=2, expert=4)
B, T = 16, 256  # T: two splash blocks; B splits over data x fsdp x expert
CACHE = 512  # slots: a multiple of the decode kernel's block


def export_modules(fn, *args) -> dict[str, str]:
    """{platform: the StableHLO text of `fn` lowered for it}, for tpu and cuda."""
    # ragged_all_to_all lowers to a custom call without JAX's compatibility guarantee.
    checks = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
    return {
        p: export.export(fn, platforms=[p], disabled_checks=checks)(*args).mlir_module()
        for p in ("tpu", "cuda")
    }


def kernel_names(module: str) -> collections.Counter:
    """How many Pallas TPU calls of each kernel an exported module holds."""
    return collections.Counter(re.findall(r'kernel_name = "([^"]+)"', module))


def bf16_dot_share(module: str) -> float:
    """The share of the module's dot_generals whose operands are bf16 (mixed precision: the
    matmuls; the router's and the fp32 softmax's are the rest)."""
    operands = re.findall(r"stablehlo.dot_general .*: \((.*?)\) ->", module)
    assert operands, "no dot_general found"
    return sum("bf16" in o for o in operands) / len(operands)


def shapes(tree, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


@functools.cache
def mesh():
    return dj.make_mesh(**MESH)


def test_train_step_exports_with_the_tpu_kernels():
    oc = OptimizerSettings(warmup_steps=2)
    optimizer = opt.make_optimizer(oc, 10)
    state = jax.eval_shape(functools.partial(init_state, CFG, optimizer, 0))
    shardings = steps.state_shardings(CFG, mesh(), state)
    fn = steps.make_train_step(CFG, optimizer, opt.schedule(oc, 10), mesh(), shardings, 1)
    batch_sharding = rules.batch_sharding(mesh())
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch_sharding)
    weights = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=batch_sharding)
    batch = dict(
        inputs=tokens, targets=tokens, positions=tokens, segment_ids=tokens, weights=weights
    )
    modules = export_modules(fn, shapes(state, shardings), batch)
    module = modules["tpu"]

    names = kernel_names(module)
    assert {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals"} <= set(
        names
    )  # attention forward and backward
    # megablox's gmm and tgmm (the weight gradients) both call their Pallas kernel "kernel";
    # identical calls share one lowered function, so this counts distinct ones.
    assert names["kernel"] >= 6, names
    # Expert parallelism: the ragged dispatch on both accelerators, there and back.
    assert all(m.count("@ragged_all_to_all") >= 4 for m in modules.values())
    assert "tpu_custom_call" not in modules["cuda"]
    # The GPU's kernels (cuDNN attention, the Mosaic GPU grouped matmul) trace only on a GPU
    # host (tests/test_gpu.py): exported from this one, the cuda program takes the plain paths.
    assert "mosaic_gpu" not in modules["cuda"] and "ragged_dot" not in modules["cuda"]
    # Mixed precision: fp32 master params and AdamW moments in the state, bf16 matmuls.
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    mu = state.opt_state[1][0].mu
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(mu))
    assert CFG.dtype == "bfloat16"
    assert bf16_dot_share(module) > 0.5, bf16_dot_share(module)


def test_prefill_and_decode_export_with_the_tpu_kernels():
    params = shapes(
        jax.eval_shape(lambda: dj.init_params(CFG, jax.random.key(0))),
        placement.param_shardings(CFG, mesh()),
    )
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=rules.batch_sharding(mesh()))
    lengths = jax.ShapeDtypeStruct((B,), jnp.int32)

    @jax.jit
    def prefill_step(params, tokens, lengths):
        return prefill(CFG, params, tokens, lengths, CACHE, mesh())

    module = export_modules(prefill_step, params, tokens, lengths)["tpu"]
    assert bf16_dot_share(module) > 0.5, bf16_dot_share(module)
    names = kernel_names(module)
    # gmm for gate/up ([D, I] weights: one lowered function for both) and for down ([I, D])
    assert names["splash_mha_fwd_segmented_no_residuals"] and names["kernel"] >= 2, names

    cache = jax.eval_shape(lambda: init_cache(CFG, B, CACHE))
    cache = shapes(cache, placement.cache_shardings(mesh(), cache))
    last = jax.ShapeDtypeStruct((B,), jnp.int32)

    @jax.jit
    def one_token(params, last, positions, cache):
        return decode_step(CFG, unstack_params(CFG, params), last, positions, cache, mesh())

    modules = export_modules(one_token, params, last, last, cache)
    # The Pallas decode kernel once per layer (and megablox for the expert-parallel MoE).
    assert kernel_names(modules["tpu"])["mla_latent_decode"] == CFG.num_hidden_layers
    assert "tpu_custom_call" not in modules["cuda"]
