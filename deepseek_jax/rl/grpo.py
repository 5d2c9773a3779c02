"""GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1) on the training mesh: the loop.

Each step samples G answers to each of P prompts from the state being trained
(`rl.rollout`), scores them with a registered reward (`rl.rewards`), normalises rewards
within each group, takes the reference log-probs from a frozen copy of the starting params,
then makes `updates` optimizer steps on the clipped-ratio objective with a KL penalty plus
the MoE balance losses (`rl.objective`). The run's mesh, checkpoints, resume and metrics are
pretraining's (`train.context.RunContext`).

    deepseek-jax-train --config grpo --config.grpo.init_from=runs/sft
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from deepseek_jax.checkpoint import read_weights
from deepseek_jax.config import ModelConfig
from deepseek_jax.data.pipeline import make_tokenizer
from deepseek_jax.errors import UserError
from deepseek_jax.parallel import rules
from deepseek_jax.rl import rollout as rollouts
from deepseek_jax.rl.objective import group_advantages, make_reference_fn, make_update_step
from deepseek_jax.rl.rewards import RewardFn, reward_fn
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.context import RunContext
from deepseek_jax.train.settings import GRPOSettings, RunConfig
from deepseek_jax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every GRPO step reads and no step changes."""

    cfg: ModelConfig
    settings: GRPOSettings
    mesh: Mesh
    tokenizer: object
    reward: RewardFn
    prompts: list  # ids with the generation prompt
    texts: list  # the user's text of each prompt (what rewards read)
    reference: dict  # the frozen starting params
    reference_logp: Callable  # objective.make_reference_fn
    update: Callable  # objective.make_update_step


def grpo_step(setup: Setup, state: TrainState, indices: np.ndarray, seed: int):
    """Sample, score, then `updates` optimizer steps on the batch of prompts `indices`.
    Returns the new state and the step's metrics (the last update's KL and clipping)."""
    settings, eos, mesh = setup.settings, setup.tokenizer.eos_id, setup.mesh
    prompts = [setup.prompts[i] for i in indices]
    start = time.perf_counter()
    new = rollouts.sample_answers(
        setup.cfg, state.params, prompts, settings.group_size, settings.max_new_tokens,
        settings.temperature, eos, mesh, seed,
    )  # fmt: skip
    mask = rollouts.answer_mask(new, eos)
    answers = [
        setup.tokenizer.decode(row[(m > 0) & (row != eos)])
        for row, m in zip(new, mask, strict=True)
    ]
    texts = [setup.texts[i] for i in indices]
    rewards = rollouts.score(setup.reward, texts, answers, settings.group_size)
    sample_s = time.perf_counter() - start

    start = time.perf_counter()
    width = max(len(p) for p in setup.prompts) + settings.max_new_tokens
    tokens, starts = (
        rollouts.on_mesh(mesh, x) for x in rollouts.teacher_forced(prompts, new, width)
    )
    advantages = np.asarray(group_advantages(rewards)).reshape(-1)
    batch = rollouts.Rollout(
        tokens=tokens,
        starts=starts,
        answer_mask=rollouts.on_mesh(mesh, mask),
        old_logp=rollouts.on_mesh(mesh, np.zeros(mask.shape, np.float32)),
        ref_logp=setup.reference_logp(setup.reference, tokens, starts),
        advantages=rollouts.on_mesh(mesh, advantages),
        first_update=rollouts.replicated(mesh, True),
    )
    for _ in range(settings.updates):
        state, metrics, old_logp = setup.update(state, batch)
        batch = batch.replace(old_logp=old_logp, first_update=rollouts.replicated(mesh, False))
    metrics = jax.device_get(metrics)
    learn_s = time.perf_counter() - start
    return state, {
        **metrics,
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(),
        "response_length": mask.sum(axis=1).mean(),
        "sample_s": sample_s,
        "learn_s": learn_s,
    }


def initial_params(settings: GRPOSettings, cfg: ModelConfig, shardings) -> dict:
    """The params GRPO starts from (and the frozen reference): `init_from`'s checkpoint of
    step `init_step` (-1: the latest), placed on the mesh by the rules."""
    if not settings.init_from:
        raise UserError(
            "grpo.init_from is empty: give the run directory of an SFT (or pretraining) run, "
            "e.g. --config.grpo.init_from=runs/sft"
        )
    # Any checkpoint of the same architecture (execution fields such as scan_unroll may differ).
    step = "" if settings.init_step < 0 else f":{settings.init_step}"
    return read_weights(f"{settings.init_from}{step}", cfg, shardings)


def check_sizes(settings: GRPOSettings, prompts: int, path: str, mesh: Mesh) -> None:
    if settings.prompts_per_step > prompts:
        raise UserError(
            f"grpo.prompts_per_step={settings.prompts_per_step} but {path} holds "
            f"{prompts} prompts: lower it or add prompts"
        )
    samples = settings.prompts_per_step * settings.group_size
    splits = rules.token_devices(mesh)
    if samples % splits:
        raise UserError(
            f"grpo.prompts_per_step x grpo.group_size = {samples} samples do not split over "
            f"the {splits} devices of mesh axes {rules.token_axes()}: make the product a "
            f"multiple of {splits}"
        )


def run(config: RunConfig) -> dict:
    """GRPO as `config` says (configs/grpo.py); returns the last step's metrics."""
    if config.grpo is None:
        raise UserError(
            "config.grpo is missing: GRPO needs its settings (start from configs/grpo.py, or "
            "give RunConfig(grpo=GRPOSettings(...)))"
        )
    with RunContext(config.train, config.mesh) as context:
        return grpo_loop(config, context)


def grpo_loop(config: RunConfig, context: RunContext):
    train, settings, mesh, cfg = config.train, config.grpo, context.mesh, config.model
    tokenizer = make_tokenizer(config.data.tokenizer)
    prompts, texts = rollouts.read_prompts(config.data.path, config.data.text_field, tokenizer)
    reward = reward_fn(settings.reward)
    check_sizes(settings, len(prompts), config.data.path, mesh)

    optimizer = opt.make_optimizer(config.optimizer, train.steps * settings.updates)
    state, shardings = steps.init_sharded_state(cfg, optimizer, train.seed, mesh)
    start_params = initial_params(settings, cfg, shardings.params)
    # The reference stays the starting params; the policy is a separate copy being trained.
    reference = jax.tree.map(jnp.copy, start_params)
    opt_init = jax.jit(optimizer.init, out_shardings=shardings.opt_state)
    state = state.replace(params=start_params, opt_state=opt_init(start_params))

    order = grain.MapDataset.range(len(prompts)).shuffle(train.seed).repeat()
    batches = iter(order.batch(settings.prompts_per_step, drop_remainder=True))
    state = context.start(
        cfg, config.data.tokenizer, config.to_dict(), state, batches, settings.updates
    )

    setup = Setup(
        cfg=cfg,
        settings=settings,
        mesh=mesh,
        reference=reference,
        reference_logp=make_reference_fn(cfg, mesh, shardings.params, settings.max_new_tokens),
        update=make_update_step(
            cfg, optimizer, mesh, shardings, settings.clip_eps, settings.kl_coef
        ),
        tokenizer=tokenizer,
        reward=reward,
        prompts=prompts,
        texts=texts,
    )
    metrics: dict = {}
    first = int(state.step) // settings.updates + 1
    for step in tqdm(range(first, train.steps + 1), desc="grpo", disable=not context.primary):
        seed = train.seed * 100_003 + step
        state, metrics = grpo_step(setup, state, next(batches), seed=seed)
        context.check()
        if step % train.log_every == 0 or step == train.steps:
            context.log.write("train", step, metrics)
            tqdm.write(
                f"step {step}: reward {metrics['reward_mean']:.3f} kl {metrics['kl']:.4f} "
                f"sample {metrics['sample_s']:.1f}s learn {metrics['learn_s']:.1f}s"
            )
        if step % train.save_every == 0 or step == train.steps:
            context.save(state, batches)
    return metrics
