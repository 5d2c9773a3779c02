"""GRPO: the sampler's log-probs are a teacher-forced forward's, the first update's ratio is
exactly 1 in bf16 (pi_old from the update's own forward), one update on a toy raises the
rewarded answer's log-prob and lowers the others', rewards are pluggable, and SFT then GRPO
run end to end from configs/sft.py and configs/grpo.py through train.py's dispatch."""

import os
import sys

import jax
import numpy as np
import optax
import pytest
from test_sft import CFG
from train_helpers import typed, write_additions

import deepseek_jax as dj
from deepseek_jax.rl import grpo, rewards, sft
from deepseek_jax.rl import rollout as rollouts
from deepseek_jax.rl.objective import (
    answer_logprobs,
    group_advantages,
    make_reference_fn,
    make_update_step,
)
from deepseek_jax.train import step as steps
from deepseek_jax.train.metrics import read

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [[10, 11, 12, 13], [20, 21]]


def test_sampler_logprobs_equal_teacher_forced():
    params = dj.init_params(CFG, jax.random.key(0))
    new, logp = dj.generate(
        CFG, params, [p for p in PROMPTS for _ in range(3)], 7, temperature=1.0, seed=3,
        return_logprobs=True, mesh=dj.make_mesh(),
    )  # fmt: skip
    new, logp = np.asarray(new), np.asarray(logp)
    assert len({tuple(r) for r in new}) > 2  # sampled, not greedy
    tokens, starts = rollouts.teacher_forced(PROMPTS, new, width=4 + 7)
    forced, _ = answer_logprobs(CFG, params, tokens, starts, 7)
    np.testing.assert_allclose(logp, forced, atol=2e-5)


def test_first_update_ratio_is_exactly_one_in_bf16():
    """pi_old comes from the update's own forward: no sampler-vs-update rounding gap, which in
    bf16 is large (checked here, so that the test could fail)."""
    cfg = CFG.replace(dtype="bfloat16")
    mesh = dj.make_mesh()
    optimizer = optax.sgd(0.01)
    state, shardings = steps.init_sharded_state(cfg, optimizer, 0, mesh)
    prompts, n = PROMPTS, 6
    new, sampler_logp = dj.generate(
        cfg, state.params, [p for p in prompts for _ in range(4)], n, temperature=1.0, seed=1,
        return_logprobs=True, mesh=mesh,
    )  # fmt: skip
    new = np.asarray(new)
    tokens, starts = rollouts.teacher_forced(prompts, new, width=4 + n)
    reference = make_reference_fn(cfg, mesh, shardings.params, n)(state.params, tokens, starts)
    assert np.abs(np.asarray(sampler_logp) - np.asarray(reference)).max() > 1e-3
    batch = rollouts.Rollout(
        tokens=tokens,
        starts=starts,
        answer_mask=rollouts.answer_mask(new, eos=None),
        old_logp=np.zeros(new.shape, np.float32),
        ref_logp=reference,
        advantages=np.tile([1.0, -1.0], len(new) // 2).astype(np.float32),
        first_update=np.array(True),
    )
    update = make_update_step(cfg, optimizer, mesh, shardings, clip_eps=0.2, kl_coef=0.04)
    state, metrics, old_logp = update(state, batch)
    assert float(metrics["ratio_deviation"]) == 0.0 and float(metrics["clip_fraction"]) == 0.0
    batch = batch.replace(old_logp=old_logp, first_update=np.array(False))
    state, metrics, _ = update(state, batch)
    assert float(metrics["ratio_deviation"]) > 0.0  # the policy moved, pi_old did not


def test_one_step_raises_the_rewarded_answer_and_lowers_the_others():
    mesh = dj.make_mesh()
    optimizer = optax.sgd(0.01)
    state, shardings = steps.init_sharded_state(CFG, optimizer, 0, mesh)
    update = make_update_step(CFG, optimizer, mesh, shardings, clip_eps=0.2, kl_coef=0.04)
    answers = np.array([[30, 31], [40, 41], [50, 51], [60, 61]])
    tokens, starts = rollouts.teacher_forced(PROMPTS[:1], answers, width=4 + 2)
    before, _ = answer_logprobs(CFG, state.params, tokens, starts, 2)
    scores = np.array([[1.0, 0.0, 0.0, 0.0]])
    rollout = rollouts.Rollout(
        tokens=tokens,
        starts=starts,
        answer_mask=rollouts.answer_mask(answers, eos=None),
        old_logp=np.zeros(answers.shape, np.float32),
        ref_logp=before,
        advantages=group_advantages(scores).reshape(-1),
        first_update=np.array(True),
    )
    state, metrics, _ = update(state, rollout)
    after, _ = answer_logprobs(CFG, state.params, tokens, starts, 2)
    change = np.asarray(after - before).sum(axis=1)
    assert change[0] > 0 and (change[1:] < 0).all(), change
    assert float(metrics["kl"]) == 0.0 and float(metrics["clip_fraction"]) == 0.0


def test_rewards_masks_and_layout():
    assert rewards.reward_fn("reversed_sum")("012+039", " 1500") == 1.0
    assert rewards.reward_fn("reversed_sum")("12+39", "150") == 1.0
    assert rewards.reward_fn("reversed_sum")("12+39", "51") == 0.0
    with pytest.raises(ValueError, match="grpo.reward='nope' is not registered"):
        rewards.reward_fn("nope")

    @rewards.register_reward("length_test")
    def length(prompt, completion):
        return float(len(completion))

    assert rewards.reward_fn("length_test")("", "abc") == 3.0
    mask = rollouts.answer_mask(np.array([[5, 4, 4, 4], [5, 6, 7, 8]]), eos=4)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    tokens, starts = rollouts.teacher_forced(PROMPTS, np.array([[1, 2]] * 4), width=6)
    assert tokens.tolist()[2] == [20, 21, 1, 2, 0, 0] and starts.tolist() == [4, 4, 2, 2]


def test_sft_then_grpo_end_to_end(tmp_path):
    sys.path.insert(0, ROOT)
    from deepseek_jax.configs import grpo as grpo_config
    from deepseek_jax.configs import sft as sft_config

    data = write_additions(tmp_path / "add.jsonl")

    def shrink(config):
        for key, value in CFG.to_dict().items():
            if key in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
                config.model[key] = value
        config.data.path = data
        config.data.holdout_fraction = 0.1
        config.optimizer.warmup_steps = 1
        config.train.batch_size = 4
        config.train.steps = 4
        config.train.async_checkpoint = False
        return config

    config = shrink(sft_config.get_config())
    config.train.run_dir = str(tmp_path / "sft")
    result = sft.run(typed(config))
    assert result["step"] == 4 and np.isfinite(result["eval_loss"])

    config = shrink(grpo_config.get_config())
    config.train.steps = 2
    config.train.run_dir = str(tmp_path / "grpo")
    config.grpo.init_from = str(tmp_path / "sft")
    config.grpo.prompts_per_step = 2
    config.grpo.group_size = 4
    grpo.run(typed(config))
    records = [r for r in read(config.train.run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward_mean", "reward_std", "kl", "clip_fraction", "response_length"):
        assert np.isfinite(records[-1][key])
    assert records[-1]["sample_s"] > 0 and records[-1]["learn_s"] > 0
    _, params = dj.load_checkpoint(config.train.run_dir)  # step 2 x 2 updates
    assert jax.tree.structure(params) == jax.tree.structure(dj.init_params(CFG, jax.random.key(0)))
