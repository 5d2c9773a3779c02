"""Training: schedules, the masked loss, gradient accumulation, document isolation, the loop
end to end (metrics, eval, plot, load_params), the NaN stop, and config checking."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import random_batch, small_config, typed

import deepseek_jax as dj
from deepseek_jax.checkpoint.orbax import load_params
from deepseek_jax.data import packing
from deepseek_jax.train import losses
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.context import train_mesh
from deepseek_jax.train.loop import NonFiniteLossError, run
from deepseek_jax.train.plot import plot_run
from deepseek_jax.train.settings import MeshSettings, OptimizerSettings

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_step_schedule_warms_up_then_drops_at_60_and_90_percent():
    oc = OptimizerSettings(learning_rate=1.0, warmup_steps=10)
    lr = opt.schedule(oc, 100)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
    assert float(lr(59)) == pytest.approx(1.0)
    assert float(lr(61)) == pytest.approx(0.316)
    assert float(lr(95)) == pytest.approx(0.316**2)
    oc = dataclasses.replace(oc, schedule="cosine")
    assert float(opt.schedule(oc, 100)(100)) == pytest.approx(oc.final_fraction)


def test_weight_decay_skips_norm_scales():
    mask = opt.decay_mask({"w": jnp.ones((2, 2)), "scale": jnp.ones(2)})
    assert mask == {"w": True, "scale": False}


def test_masked_targets_do_not_count():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 7))
    weights = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    a = losses.nll_sum(logits, jnp.array([[1, 2, 3, 4]]), weights)
    b = losses.nll_sum(logits, jnp.array([[1, 6, 3, 0]]), weights)
    assert float(a) == float(b)


def test_mesh_must_cover_every_device():
    assert train_mesh(MeshSettings()).size == jax.device_count()
    with pytest.raises(ValueError, match="data x fsdp x expert x tensor = 1"):
        train_mesh(MeshSettings(data=1, expert=2))


def test_gradient_accumulation_matches_the_full_batch():
    """With SGD at rate 1 a step moves the params by exactly minus the gradient: two
    micro-batches must give the full batch's gradient, leaf by leaf."""
    cfg = dj.preset("tiny").replace(num_hidden_layers=2)
    optimizer, mesh, batch = optax.sgd(1.0), dj.make_mesh(), random_batch()
    grads = []
    for micro in (1, 2):
        state, shardings = steps.init_sharded_state(cfg, optimizer, 0, mesh)
        before = jax.device_get(state.params)
        fn = steps.make_train_step(
            cfg, optimizer, optax.constant_schedule(1.0), mesh, shardings, micro
        )
        state, _ = fn(state, steps.global_batch(mesh, batch))
        grads.append(jax.tree.map(lambda b, a: b - np.asarray(a), before, state.params))
    for full, accumulated in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(accumulated, full, rtol=1e-4, atol=1e-7)
    assert max(np.abs(g).max() for g in jax.tree.leaves(grads[0])) > 1e-3


def test_packed_documents_do_not_see_each_other():
    """A document's logits inside a packed row equal its logits alone."""
    cfg = dj.preset("tiny").replace(num_hidden_layers=2)
    params = jax.jit(lambda: dj.init_params(cfg, jax.random.key(1)))()
    first, second = np.arange(3, 13), np.arange(100, 122)
    ex = packing.example(*next(packing.pack([first, second], 31)))
    packed = steps.forward(
        cfg, params, {k: jnp.asarray(v)[None] for k, v in ex.items() if k != "weights"}
    ).logits[0]
    alone = dj.DeepSeekV2(cfg).apply({"params": params}, jnp.asarray(second)[None]).logits[0]
    np.testing.assert_allclose(packed[10:], alone[:21], atol=1e-4)


def test_training_run_end_to_end(tmp_path):
    config = small_config(tmp_path, steps=30, eval_every=15)
    config.model.num_hidden_layers = 2
    result = run(typed(config))
    records = [json.loads(x) for x in open(os.path.join(config.train.run_dir, "metrics.jsonl"))]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [15, 30]
    assert train[-1]["ce"] < train[0]["ce"] - 0.5
    assert evals[-1]["eval_loss"] < result["unigram_loss"]
    assert evals[-1]["eval_bits_per_byte"] == pytest.approx(evals[-1]["eval_loss"] / math.log(2))
    assert np.asarray(train[-1]["load"]).shape == (1, 16)  # [L_moe, E]
    # One device: nothing dropped; fan-out over routing groups, at most M of them.
    assert train[-1]["drop_rate"] == [0.0] and train[-1]["never_drop_drop_rate"] == [0.0]
    assert 1.0 <= train[-1]["fanout_mean"][0] <= train[-1]["fanout_max"][0] <= 2
    assert train[-1]["tokens_per_s"] > 0
    assert os.listdir(os.path.join(config.train.run_dir, "tb"))
    plots = plot_run(config.train.run_dir)
    assert "dispatch.png" in [os.path.basename(p) for p in plots]
    assert all(os.path.getsize(p) > 0 for p in plots)

    cfg, params = load_params(config.train.run_dir)
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == 256
    logits = dj.DeepSeekV2(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32)).logits
    assert np.isfinite(np.asarray(logits)).all()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # Adam moves every weight by ~lr: step 1 is finite, then the logits overflow.
    config = small_config(tmp_path, steps=6, save_every=1, eval_every=100)
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e30, 0
    with pytest.raises(NonFiniteLossError, match="last good checkpoint is step 1") as stop:
        run(typed(config))
    assert "\n" not in str(stop.value) and "learning_rate" in str(stop.value)
    assert sorted(os.listdir(os.path.join(config.train.run_dir, "checkpoints"))) == ["1"]
    _, params = load_params(config.train.run_dir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_unknown_config_field_fails_before_any_work():
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "tiny", "--config.train.stepz=5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "stepz" in proc.stderr
