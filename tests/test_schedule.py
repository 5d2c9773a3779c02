"""The paper's training recipe: weight decay by param path, the batch ramp (schedule and grain
pipeline), the rate by tokens, the v2 / v2_long / v2_lite configs' numbers (paper 3.2.1,
3.2.2, Appendix B), the plan printer, and the bad inputs' one-line errors."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from train_helpers import small_config, typed

import deepseek_jax as dj
from deepseek_jax import configs
from deepseek_jax.config import PRESETS
from deepseek_jax.data import pipeline
from deepseek_jax.data.pipeline import BatchSizes
from deepseek_jax.errors import UserError
from deepseek_jax.model.rope import yarn_mscale
from deepseek_jax.model.transformer import DeepSeekV2
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import schedule
from deepseek_jax.train.loop import run
from deepseek_jax.train.settings import OptimizerSettings, TrainSettings

ROOT = os.path.join(os.path.dirname(__file__), "..")


def config_of(name):
    """A shipped config as the library takes it (typed)."""
    return configs.from_config_dict(configs.load(name))


def one_line_error(fn, *args, match):
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)
    return str(e.value)


# Weight decay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_weight_decay_by_path_on_every_preset(name):
    """Every leaf of the real params tree: decayed unless it belongs to a norm (stacked too)."""
    cfg = PRESETS[name]()
    shapes = jax.eval_shape(
        lambda: DeepSeekV2(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    shapes = nn.meta.unbox(shapes)
    decisions = jax.tree_util.tree_flatten_with_path(opt.decay_mask(shapes))[0]
    leaves = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
    stacked_norms = 0
    for path, decayed in decisions:
        keys = [k.key for k in path]
        in_norm = any(k.endswith("norm") for k in keys[:-1])
        assert decayed == (not in_norm), (jax.tree_util.keystr(path), decayed)
        stacked_norms += in_norm and leaves[path].ndim == 2  # [L, D]: the old rank test's miss
    assert stacked_norms >= 3  # attn_norm, mlp_norm, kv_norm of each stack
    assert len(decisions) == len(leaves)


def test_adamw_decays_matrices_and_leaves_norm_scales():
    """Zero gradients: Adam's step is 0, so only the decoupled decay moves a param."""
    cfg = dj.preset("tiny").replace(num_hidden_layers=2)
    params = dj.init_params(cfg, jax.random.key(0))
    oc = OptimizerSettings(warmup_steps=0, learning_rate=0.1, weight_decay=0.5)
    optimizer = opt.make_optimizer(oc, 10)

    @jax.jit
    def step(params):
        grads = jax.tree.map(jnp.zeros_like, params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return optax.apply_updates(params, updates)

    new = step(params)
    for (path, p), q in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(new), strict=True
    ):
        expected = p if path[-1].key == "scale" else p * (1 - 0.1 * 0.5)
        np.testing.assert_allclose(q, expected, rtol=1e-6, err_msg=jax.tree_util.keystr(path))


# Batch sizes, plan and rate by tokens ----------------------------------------------------------


def test_batch_sizes_and_plan_count_tokens_across_stages():
    sizes = BatchSizes((2, 4, 8), (1, 4, 6))  # steps 1-3: 2, steps 4-5: 4, then 8
    assert [sizes.at(s) for s in range(1, 9)] == [2, 2, 2, 4, 4, 8, 8, 8]
    assert [sizes.before(s) for s in (1, 2, 4, 6, 8)] == [0, 2, 6, 14, 30]
    plan = schedule.Plan(seq_len=10, steps=8, batches=sizes)
    assert plan.tokens == 380 and plan.tokens_after(5) == 140
    assert [plan.step_reaching(t) for t in (0, 1, 60, 61, 140, 141, 380)] == [0, 1, 3, 4, 5, 6, 8]
    counts = jnp.arange(9)
    np.testing.assert_array_equal(
        plan.tokens_after_jnp(counts), [plan.tokens_after(int(c)) for c in counts]
    )


def test_ramp_is_a_staircase_of_equal_token_shares():
    tc = TrainSettings(batch_size=16, ramp_start=4, ramp_tokens=3000, ramp_stages=3)
    sizes = schedule.ramp(tc, seq_len=10)
    assert sizes.sizes == (4, 8, 12, 16)
    plan = schedule.Plan(10, 100, sizes)
    for i, start in enumerate(sizes.starts[1:], 1):  # stage i ends once i/3 of 3000 is trained
        assert plan.tokens_after(start - 1) >= 1000 * i > plan.tokens_after(start - 2)


def test_rate_drops_by_tokens_not_steps_when_the_batch_ramps():
    oc = OptimizerSettings(learning_rate=1.0, warmup_steps=2, decay_at=(0.5,))
    plan = schedule.Plan(1, 20, BatchSizes((1, 3), (1, 11)))  # 10 tokens, then 3 a step
    assert plan.tokens == 40
    lr = schedule.learning_rate(oc, plan)
    # Half the tokens (20) are trained by the end of step 14 (10 + 3 * 4 = 22 > 20 >= 19).
    assert plan.step_reaching(20) == 14
    assert float(lr(13)) == 1.0 and float(lr(14)) == pytest.approx(0.316)
    assert float(lr(0)) == 0.0 and float(lr(1)) == 0.5
    oc = dataclasses.replace(oc, schedule="cosine")
    cosine = schedule.learning_rate(oc, plan)
    # Cosine by tokens: halfway through the tokens after warmup, the rate is halfway down.
    half = plan.step_reaching((plan.tokens + plan.tokens_after(2)) / 2)
    assert float(cosine(20)) == pytest.approx(oc.final_fraction)
    assert float(cosine(half)) == pytest.approx((1 + oc.final_fraction) / 2, abs=0.05)


# The paper's configs ---------------------------------------------------------------------------


def test_v2_config_is_paper_3_2_1():
    config = config_of("v2")
    plan = schedule.make_plan(config)
    m, oc, step_tokens = config.model, config.optimizer, 9216 * 4096
    assert plan.seq_len == 4096
    assert 8.1e12 <= plan.tokens < 8.1e12 + step_tokens
    assert plan.batches.sizes[0] == 2304 and plan.batches.sizes[-1] == 9216
    assert list(plan.batches.sizes) == sorted(plan.batches.sizes)
    ramp_end = plan.tokens_after(plan.batches.starts[-1] - 1)
    assert 225e9 <= ramp_end < 225e9 + 6912 * 4096
    assert plan.batches.at(plan.steps) == 9216
    lr = schedule.learning_rate(oc, plan)
    assert float(lr(0)) == 0.0 and float(lr(2000)) == pytest.approx(2.4e-4)
    for count, fraction, factor in zip(
        schedule.decay_steps(oc, plan), (0.6, 0.9), (1, 2), strict=True
    ):
        assert plan.tokens_after(count) >= fraction * plan.tokens > plan.tokens_after(count - 1)
        assert float(lr(count - 1)) == pytest.approx(2.4e-4 * 0.316 ** (factor - 1))
        assert float(lr(count)) == pytest.approx(2.4e-4 * 0.316**factor)
    assert (oc.b1, oc.b2, oc.weight_decay, oc.clip_norm) == (0.9, 0.95, 0.1, 1.0)
    assert m.initializer_range == 0.006
    assert (m.aux_loss_alpha1, m.aux_loss_alpha2, m.aux_loss_alpha3) == (0.003, 0.05, 0.02)
    assert (m.topk_method, m.topk_group, m.n_group, config.mesh.expert) == (
        "group_limited_greedy",
        3,
        8,
        8,
    )
    assert (m.capacity_factor, m.no_drop_fraction) == (1.0, 0.1)
    assert m.rope_scaling is None and m.max_position_embeddings == 4096


def test_v2_lite_config_is_appendix_b():
    config = config_of("v2_lite")
    plan = schedule.make_plan(config)
    m, oc = config.model, config.optimizer
    assert plan.batches.sizes == (4608,) and plan.seq_len == 4096
    assert 5.7e12 <= plan.tokens < 5.7e12 + 4608 * 4096
    lr = schedule.learning_rate(oc, plan)
    assert float(lr(2000)) == pytest.approx(4.2e-4)
    for count, fraction in zip(schedule.decay_steps(oc, plan), (0.8, 0.9), strict=True):
        assert plan.tokens_after(count) >= fraction * plan.tokens > plan.tokens_after(count - 1)
    assert oc.clip_norm == 1.0 and oc.warmup_steps == 2000
    assert (m.aux_loss_alpha1, m.aux_loss_alpha2, m.aux_loss_alpha3) == (0.001, 0.0, 0.0)
    assert m.n_group == 1 and config.mesh.expert == 1


def test_v2_long_config_is_paper_3_2_2_and_needs_init_from():
    config = config_of("v2_long")
    plan = schedule.make_plan(config)
    y = config.model.rope_scaling
    assert (y.factor, y.beta_slow, y.beta_fast) == (40.0, 1.0, 32.0)
    # sqrt(t) = 0.0707 ln s + 1: the attention scale is multiplied by mscale(s, all_dim)^2
    assert yarn_mscale(y.factor, y.mscale_all_dim) == pytest.approx(0.0707 * math.log(40) + 1)
    assert y.mscale == y.mscale_all_dim  # cos/sin carry mscale / mscale_all_dim = 1
    assert (plan.steps, plan.seq_len, plan.batches.sizes) == (1000, 32768, (576,))
    one_line_error(schedule.resolve, config, match="train.init_from is empty")
    config = config.replace(train=dataclasses.replace(config.train, init_from="runs/v2"))
    assert schedule.resolve(config)[0].train.steps == 1000


def test_plan_printer_prints_the_run_and_bad_input_is_one_line():
    cmd = [sys.executable, "-m", "deepseek_jax.train.schedule", "--config", "v2"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "8.1T tokens" in text and "223,187 steps" in text
    for size in ("2304", "4608", "6912", "9216"):
        assert f"{size} sequences from step" in text
    assert "x0.316" in text and "(60% of the tokens)" in text and "(90% of the tokens)" in text
    assert "alpha1 0.003" in text and "alpha2 0.05" in text and "alpha3 0.02" in text
    bad = subprocess.run(
        cmd + ["--config.optimizer.decay_at=(0.6, 1.5)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "python -m deepseek_jax.train.schedule: optimizer.decay_at=(0.6, 1.5): give increasing fractions "
        "of the run's tokens strictly inside (0, 1), e.g. (0.6, 0.9)"
    ]


# Bad input -------------------------------------------------------------------------------------


def v2_with(section: str, **changes):
    """configs/v2.py with `changes` to one section."""
    config = config_of("v2")
    return config.replace(**{section: dataclasses.replace(getattr(config, section), **changes)})


def test_schedule_points_outside_the_run_are_one_line_errors():
    for section, changes, match in (
        ("optimizer", {"decay_at": (0.9, 0.6)}, r"optimizer.decay_at=\(0.9, 0.6\)"),
        # the ramp alone is 225B
        ("train", {"tokens": 100_000_000_000}, "train.ramp_tokens=225000000000 ends at step"),
        ("train", {"steps": 100}, "exactly one of them"),
        ("train", {"ramp_start": 9216}, r"train.ramp_start=9216 must lie in \(0"),
        ("optimizer", {"warmup_steps": 10**9}, "optimizer.warmup_steps=1000000000"),
    ):
        one_line_error(schedule.make_plan, v2_with(section, **changes), match=match)


def test_ramp_sizes_must_split_over_the_mesh_naming_step_and_size():
    plan = schedule.make_plan(config_of("v2"))
    schedule.check_batches(plan, micro_steps=9, splits=256, processes=1)
    message = one_line_error(
        schedule.check_batches, plan, 9, 512, 1, match="the batch of 2304 sequences from step 1 "
    )
    assert "multiple of 4608" in message
    later = schedule.Plan(1, 9, BatchSizes((6, 8), (1, 5)))
    one_line_error(schedule.check_batches, later, 1, 3, 1, match="8 sequences from step 5 ")


# The ramp in the grain pipeline and the loop ---------------------------------------------------


def test_ramped_batches_read_the_fixed_stream_in_order_and_resume(tmp_path):
    config = small_config(tmp_path)
    rows, _ = pipeline.row_datasets(typed(config).data, config.data.seq_len)
    sizes = BatchSizes((1, 2, 3), (1, 3, 5))
    ramped = iter(pipeline.train_batches(rows["train"], sizes, seed=0))
    got = [next(ramped)["inputs"] for _ in range(6)]
    assert [len(b) for b in got] == [1, 1, 2, 2, 3, 3]
    fixed = iter(pipeline.train_batches(rows["train"], 1, seed=0))
    expected = np.concatenate([next(fixed)["inputs"] for _ in range(12)])
    np.testing.assert_array_equal(np.concatenate(got), expected)

    state = None
    it = iter(pipeline.train_batches(rows["train"], sizes, seed=0))
    for _ in range(3):
        next(it)
    state = it.get_state()
    resumed = iter(pipeline.train_batches(rows["train"], sizes, seed=0))
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["inputs"], got[3])

    # Two processes: halves of each global batch, disjoint.
    shares = [
        [next(i)["inputs"] for _ in range(4)]
        for i in (iter(pipeline.train_batches(rows["train"], sizes, 0, s, 2)) for s in (0, 1))
    ]
    seen = [{row.tobytes() for b in part for row in b} for part in shares]
    assert not seen[0] & seen[1]


def test_an_epoch_past_the_end_is_reshuffled(tmp_path):
    config = small_config(tmp_path)
    rows, _ = pipeline.row_datasets(typed(config).data, config.data.seq_len)
    n = len(rows["train"])
    it = iter(pipeline.train_batches(rows["train"], n, seed=0))
    first, second = next(it)["inputs"], next(it)["inputs"]
    assert sorted(r.tobytes() for r in first) == sorted(r.tobytes() for r in second)
    assert not np.array_equal(first, second)


def test_loop_trains_on_the_ramp_starts_from_init_from_and_rejects_a_bad_size(tmp_path):
    config = small_config(tmp_path / "a", steps=6, log_every=1, eval_every=6, save_every=6)
    config.train.ramp_start, config.train.ramp_tokens, config.train.ramp_stages = 2, 2 * 64 * 3, 1
    run(typed(config))
    records = [json.loads(x) for x in open(os.path.join(config.train.run_dir, "metrics.jsonl"))]
    targets = [r["tokens"] for r in records if r["kind"] == "train"]
    # 3 steps of 2 rows of 64, then 3 of 4 (a document boundary drops a target or so)
    assert all(100 < t <= 128 for t in targets[:3]) and all(200 < t <= 256 for t in targets[3:])

    # A later stage starts from this run's params (train.init_from), not from scratch.
    later = small_config(tmp_path / "c", steps=1, log_every=1, eval_every=1, save_every=1)
    later.train.init_from, later.optimizer.warmup_steps = config.train.run_dir, 0
    run(typed(later))
    first = [json.loads(x) for x in open(os.path.join(later.train.run_dir, "metrics.jsonl"))]
    ce = [r["ce"] for r in records if r["kind"] == "train"]
    assert first[0]["ce"] < ce[0] - 1.0 and first[0]["ce"] == pytest.approx(ce[-1], abs=0.5)

    config = small_config(tmp_path / "b", micro_steps=2)
    config.train.ramp_start, config.train.ramp_tokens, config.train.ramp_stages = 3, 384, 1
    message = one_line_error(run, typed(config), match="the batch of 3 sequences from step 1 ")
    assert "train.micro_steps=2" in message
