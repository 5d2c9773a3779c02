"""Sharded training on 8 fake CPU devices. `tests/test_train_sharded.py` runs this file in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the device count is fixed
when jax starts, and the rest of the suite runs on one device)."""

import grain
import jax
import numpy as np
import optax
import pytest
from train_helpers import random_batch

import deepseek_jax as dj
from deepseek_jax.checkpoint import orbax as ckpt
from deepseek_jax.rl import rollout as rollouts
from deepseek_jax.rl.objective import group_advantages, make_reference_fn, make_update_step
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.settings import OptimizerSettings

if jax.device_count() != 8:
    pytest.skip("needs 8 devices: run through tests/test_train_sharded.py", allow_module_level=True)

# Dropless (the tiny preset's capacity_factor None), so every mesh computes the same function.
CFG = dj.preset("tiny").replace(num_hidden_layers=2)
MESHES = {
    "one device": dict(),
    "data 2, expert 4": dict(data=2, expert=4),
    "fsdp 2, expert 2, tensor 2": dict(fsdp=2, expert=2, tensor=2),
}
STEPS = 3
# Two micro-batches of 8 rows: one row per device on (data 2, expert 4).
BATCH, MICRO_STEPS = 16, 2


class Run:
    """A train step compiled for one mesh, and the state it has reached."""

    def __init__(self, mesh):
        oc = OptimizerSettings(warmup_steps=0)
        optimizer = opt.make_optimizer(oc, 10)
        self.mesh = mesh
        self.state, self.shardings = steps.init_sharded_state(CFG, optimizer, 0, mesh)
        self.batch = steps.global_batch(mesh, random_batch(b=BATCH, t=32))
        fn = steps.make_train_step(
            CFG, optimizer, opt.schedule(oc, 10), mesh, self.shardings, MICRO_STEPS
        )
        self.compiled = fn.lower(self.state, self.batch).compile()

    def step(self) -> float:
        self.state, metrics = self.compiled(self.state, self.batch)
        return float(metrics["loss"])


@pytest.fixture(scope="module")
def runs():
    """Every mesh of MESHES after STEPS steps on one batch, with the losses on the way."""
    out = {}
    for name, sizes in MESHES.items():
        run = Run(dj.make_mesh(**sizes))
        out[name] = run, [run.step() for _ in range(STEPS)]
    return out


def assert_trees_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.parametrize("name", [n for n in MESHES if n != "one device"])
def test_sharded_steps_match_one_device(runs, name):
    (plain, plain_losses), (run, losses) = runs["one device"], runs[name]
    np.testing.assert_allclose(losses, plain_losses, rtol=1e-5)
    assert_trees_close(run.state.params, plain.state.params, atol=1e-5)
    assert_trees_close(run.state.opt_state, plain.state.opt_state, atol=1e-5)


def test_state_lies_by_the_rules_and_the_step_uses_all_to_all(runs):
    run, _ = runs["data 2, expert 4"]
    assert "all-to-all" in run.compiled.as_text()
    w_up = run.state.params["moe_layers"]["mlp"]["w_up"]  # [L, E, D, I]
    assert w_up.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    assert w_up.addressable_shards[0].data.shape == (1, 4, 256, 192)
    # ZeRO-1: AdamW's moment is split over "data" as well, its parameter is not.
    mu = run.state.opt_state[1][0].mu["moe_layers"]["mlp"]["w_up"]
    assert mu.addressable_shards[0].data.shape == (1, 4, 128, 192)


def test_checkpoint_restores_onto_another_mesh_and_training_continues(runs, tmp_path):
    source, _ = runs["data 2, expert 4"]
    target = Run(dj.make_mesh(**MESHES["fsdp 2, expert 2, tensor 2"]))
    # The checkpoint saves a data iterator's position beside the state.
    data = iter(grain.MapDataset.range(8).batch(2))
    manager = ckpt.make_manager(str(tmp_path), keep=1, use_async=False)
    ckpt.save(manager, source.state, data)
    target.state = ckpt.restore(manager, target.state, data)
    manager.close()

    assert int(target.state.step) == STEPS
    assert_trees_close(target.state.params, source.state.params, atol=0)
    assert_trees_close(target.state.opt_state, source.state.opt_state, atol=0)
    for restored, sharding in zip(
        jax.tree.leaves(target.state), jax.tree.leaves(target.shardings), strict=True
    ):
        assert restored.sharding.is_equivalent_to(sharding, restored.ndim)
    np.testing.assert_allclose(target.step(), source.step(), rtol=1e-5)
    assert_trees_close(target.state.params, source.state.params, atol=1e-5)


def test_grpo_samples_and_updates_on_the_mesh_as_on_one_device():
    """GRPO's sampler reads the training state where it lies on the mesh, and two updates on
    (data 2, expert 4) equal one device's: same samples, log-probs and gradients (SGD at rate
    1 moves the params by minus the gradient)."""
    optimizer = optax.sgd(1.0)
    prompts = [[10 + i, 11, 12 + i] for i in range(4)]
    group, n = 4, 5
    scores = np.random.default_rng(0).integers(0, 2, (len(prompts), group)).astype(np.float32)
    out = {}
    for name in ("one device", "data 2, expert 4"):
        mesh = dj.make_mesh(**MESHES[name])
        state, shardings = steps.init_sharded_state(CFG, optimizer, 0, mesh)
        new = rollouts.sample_answers(CFG, state.params, prompts, group, n, 1.0, None, mesh, 3)
        tokens, starts = rollouts.teacher_forced(prompts, new, width=3 + n)
        reference = make_reference_fn(CFG, mesh, shardings.params, n)
        batch = rollouts.Rollout(
            tokens=tokens,
            starts=starts,
            answer_mask=rollouts.answer_mask(new, eos=None),
            old_logp=np.zeros(new.shape, np.float32),
            ref_logp=reference(state.params, tokens, starts),
            advantages=group_advantages(scores).reshape(-1),
            first_update=np.array(True),
        )
        update = make_update_step(CFG, optimizer, mesh, shardings, 0.2, 0.04)
        grads, losses = [], []
        for _ in range(2):
            before = jax.device_get(state.params)
            state, metrics, old_logp = update(state, batch)
            batch = batch.replace(old_logp=old_logp, first_update=np.array(False))
            grads.append(jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params))
            losses.append(float(metrics["loss"]))
        out[name] = new, np.asarray(old_logp), grads, losses
    (new, logp, grads, losses), (new8, logp8, grads8, losses8) = out.values()
    np.testing.assert_array_equal(new8, new)
    np.testing.assert_allclose(logp8, logp, atol=1e-5)
    np.testing.assert_allclose(losses8, losses, atol=1e-6)  # the loss is ~1e-3
    assert_trees_close(grads8, grads, atol=1e-5)
    assert max(np.abs(g).max() for g in jax.tree.leaves(grads)) > 1e-3
