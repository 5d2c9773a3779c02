"""GRPO (DeepSeekMath, arXiv 2402.03300, section 4.1) on the training mesh.

Legend: P prompts a step, G samples per prompt, B = P * G, L = longest prompt + N sequence
positions, N new tokens.

Each step samples G answers to each of P prompts with `deepseek_jax.generate` from the state
being trained, on the same mesh and params (DESIGN.md 5), keeping each sampled token's
log-prob; scores them with a reward function; normalises rewards within each group; takes the
reference log-probs from a frozen copy of the starting params; then makes `updates` AdamW
steps on the clipped-ratio objective with a KL penalty (`grpo_loss`) plus the MoE balance
losses. Old log-probs are the sampler's own: the ratio starts at 1 on the first update.

    python train.py --config configs/grpo.py --config.grpo.init_from=runs/sft
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from deepseek_jax.checkpoint import orbax as ckpt
from deepseek_jax.config import ModelConfig
from deepseek_jax.data import chat
from deepseek_jax.data.pipeline import make_tokenizer
from deepseek_jax.generate.loop import generate
from deepseek_jax.parallel import rules
from deepseek_jax.rl.grpo_loss import group_advantages, grpo_loss, token_logprobs
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import step as steps
from deepseek_jax.train.metrics import MetricsLog, Silent
from deepseek_jax.train.state import TrainState, next_rng

# reward(prompt_text, completion_text) -> float; prompt_text is the last user message.
RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str):
    """Decorator: makes a reward function selectable as config.grpo.reward = name."""

    def add(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return add


def reward_fn(name: str) -> RewardFn:
    if name not in REWARDS:
        raise ValueError(
            f"grpo.reward={name!r} is not registered: choose one of {sorted(REWARDS)} or "
            "register one with @deepseek_jax.rl.grpo.register_reward(name)"
        )
    return REWARDS[name]


@register_reward("reversed_sum")
def reversed_sum(prompt: str, completion: str) -> float:
    """1 if the completion is the sum asked for by a prompt "a+b" in one more digit than the
    longer operand, zero-padded and least-significant digit first ("012+039" -> "1500"), else 0.
    In that fixed layout (minGPT's adder writes sums backwards too) each answer digit depends
    on the operand digits at a fixed offset and the carry it has just written: a task a small
    model learns in minutes on a CPU (bench/addition_demo.py)."""
    match = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", prompt)
    if match is None:
        raise ValueError(f"reward 'reversed_sum' needs prompts like '12+34', got {prompt!r}")
    width = max(len(match[1]), len(match[2])) + 1
    return float(completion.strip() == str(int(match[1]) + int(match[2])).zfill(width)[::-1])


@struct.dataclass
class Rollout:
    """B = P * G sampled answers laid out for teacher forcing, every field [B, ...]."""

    tokens: jnp.ndarray  # [B, L] prompt then answer, zero after
    starts: jnp.ndarray  # [B] index of the answer's first token in `tokens`
    answer_mask: jnp.ndarray  # [B, N] 1 up to and including eos
    old_logp: jnp.ndarray  # [B, N] the sampler's log-probs
    ref_logp: jnp.ndarray  # [B, N] the frozen reference's
    advantages: jnp.ndarray  # [B]


def answer_mask(new_BN: np.ndarray, eos: int | None) -> np.ndarray:
    """1 on each answer's tokens up to and including its first eos (all N if none)."""
    if eos is None:
        return np.ones_like(new_BN, np.float32)
    is_eos = new_BN == eos
    before = np.cumsum(is_eos, axis=1) - is_eos  # eos tokens strictly before t
    return (before == 0).astype(np.float32)


def teacher_forced(
    prompts: list[list[int]], new_BN: np.ndarray, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt b // G followed by answer b: tokens [B, L = width] and the answers' starts [B].
    One width for every step (the longest prompt + N) keeps the update to one compile."""
    group = len(new_BN) // len(prompts)
    n = new_BN.shape[1]
    tokens = np.zeros((len(new_BN), width), np.int32)
    starts = np.zeros(len(new_BN), np.int32)
    for b, answer in enumerate(new_BN):
        prompt = prompts[b // group]
        tokens[b, : len(prompt)] = prompt
        tokens[b, len(prompt) : len(prompt) + n] = answer
        starts[b] = len(prompt)
    return tokens, starts


def answer_logprobs(
    cfg: ModelConfig,
    params,
    tokens_BL,
    starts_B,
    n: int,
    mesh: Mesh | None = None,
    token_mask_BL=None,
):
    """log pi(answer token j | prompt, answer[:j]) [B, N] by one teacher-forced forward, and
    the forward's output (for its balance losses, over the tokens of `token_mask_BL`)."""
    out = steps.forward(
        cfg,
        params,
        {"inputs": tokens_BL, "positions": None, "segment_ids": None, "token_mask": token_mask_BL},
        mesh,
    )
    logp_BL = token_logprobs(out.logits[:, :-1], tokens_BL[:, 1:])  # [B, L - 1]
    index_BN = starts_B[:, None] - 1 + jnp.arange(n)
    return jnp.take_along_axis(logp_BL, index_BN, axis=1), out


def make_reference_fn(cfg: ModelConfig, mesh: Mesh, param_shardings, n: int):
    """(params, tokens [B, L], starts [B]) -> answer log-probs [B, N], jitted on the mesh."""
    batch = rules.batch_sharding(mesh)
    rows = NamedSharding(mesh, P(batch.spec[0]))
    return jax.jit(
        lambda params, tokens, starts: answer_logprobs(cfg, params, tokens, starts, n, mesh)[0],
        in_shardings=(param_shardings, batch, rows),
        out_shardings=batch,
    )


def make_update_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    shardings: TrainState,
    clip_eps: float,
    kl_coef: float,
):
    """(state, rollout) -> (state, metrics): one AdamW step on GRPO's loss + balance losses."""
    n_axis = NamedSharding(mesh, P(rules.batch_sharding(mesh).spec[0]))

    def step(state: TrainState, r: Rollout):
        def loss_fn(params):
            # Balance losses over the prompt and the answer up to its eos, not the padding.
            ends_B1 = (r.starts + r.answer_mask.sum(axis=1).astype(r.starts.dtype))[:, None]
            real_BL = jnp.arange(r.tokens.shape[1])[None, :] < ends_B1
            logp, out = answer_logprobs(
                cfg, params, r.tokens, r.starts, r.answer_mask.shape[1], mesh, real_BL
            )
            stats = grpo_loss(
                logp, r.old_logp, r.ref_logp, r.advantages, r.answer_mask, clip_eps, kl_coef
            )
            return stats.loss + out.aux.total, (stats, out.aux)

        (loss, (stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            rng=next_rng(state.rng),
        )
        metrics = {
            "loss": loss,
            "grpo_loss": stats.loss,
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "expert_loss": aux.expert_loss,
            "grad_norm": optax.tree.norm(grads),
        }
        return new_state, metrics

    batch = rules.batch_sharding(mesh)
    rollout_shardings = Rollout(batch, n_axis, batch, batch, batch, n_axis)
    return jax.jit(
        step,
        in_shardings=(shardings, rollout_shardings),
        out_shardings=(shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def last_user_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last user message, and that message's text."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError(
            f"a GRPO prompt needs a user message; got roles {[m['role'] for m in messages]}"
        )
    return messages[: users[-1] + 1], messages[users[-1]]["content"]


def read_prompts(data_cfg, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Each conversation of the chat JSONL up to its last user turn: ids with the generation
    prompt, and the user's text (what rewards read). Assistant answers in the file are unused."""
    ids, texts = [], []
    for messages in chat.read_conversations(data_cfg.path, data_cfg.text_field):
        turns, text = last_user_turn(messages)
        ids.append(tokenizer.encode_chat(turns, add_generation_prompt=True))
        texts.append(text)
    return ids, texts


def on_host(x: jax.Array) -> np.ndarray:
    """All of x on every process (its shards gathered across processes, if several)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def on_mesh(mesh: Mesh, x: np.ndarray) -> jax.Array:
    """A host array that every process holds whole -> one array split over the mesh's token
    axes by its leading dimension, each process placing only its own devices' rows."""
    spec = P(rules.batch_sharding(mesh).spec[0], *[None] * (x.ndim - 1))
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def sample_answers(cfg, params, prompts, gc, eos, mesh, seed: int):
    """G answers to each prompt: tokens [B, N] and the sampler's log-probs [B, N], on the host
    of every process (rewards are Python functions of the decoded text)."""
    repeated = [p for p in prompts for _ in range(gc.group_size)]
    new, logp = generate(
        cfg,
        params,
        repeated,
        gc.max_new_tokens,
        temperature=gc.temperature,
        seed=seed,
        eos=eos,
        return_logprobs=True,
        mesh=mesh,
    )
    return on_host(new), on_host(logp)


def score(reward, texts: list[str], answers: list[str], group: int) -> np.ndarray:
    """Rewards [P, G]: answer b answers prompt b // G."""
    return np.array(
        [reward(texts[b // group], a) for b, a in enumerate(answers)], np.float32
    ).reshape(-1, group)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every GRPO step reads and no step changes."""

    cfg: ModelConfig
    gc: ml_collections.ConfigDict  # config.grpo
    mesh: Mesh
    tokenizer: object
    reward: RewardFn
    prompts: list  # ids with the generation prompt
    texts: list  # the user's text of each prompt (what rewards read)
    reference: dict  # the frozen starting params
    reference_logp: Callable  # make_reference_fn
    update: Callable  # make_update_step


def grpo_step(s: Setup, state: TrainState, indices: np.ndarray, seed: int):
    """Sample, score, then `grpo.updates` optimizer steps on the batch of prompts `indices`.
    Returns the new state and the step's metrics (the last update's KL and clipping)."""
    gc, eos = s.gc, s.tokenizer.eos_id
    prompts = [s.prompts[i] for i in indices]
    start = time.perf_counter()
    new, logp = sample_answers(s.cfg, state.params, prompts, gc, eos, s.mesh, seed)
    mask = answer_mask(new, eos)
    answers = [
        s.tokenizer.decode(row[(m > 0) & (row != eos)]) for row, m in zip(new, mask, strict=True)
    ]
    rewards = score(s.reward, [s.texts[i] for i in indices], answers, gc.group_size)
    sample_s = time.perf_counter() - start

    start = time.perf_counter()
    width = max(len(p) for p in s.prompts) + gc.max_new_tokens
    tokens, starts = (on_mesh(s.mesh, x) for x in teacher_forced(prompts, new, width))
    rollout = Rollout(
        tokens=tokens,
        starts=starts,
        answer_mask=on_mesh(s.mesh, mask),
        old_logp=on_mesh(s.mesh, logp),
        ref_logp=s.reference_logp(s.reference, tokens, starts),
        advantages=on_mesh(s.mesh, np.asarray(group_advantages(rewards)).reshape(-1)),
    )
    for _ in range(gc.updates):
        state, metrics = s.update(state, rollout)
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


def initial_params(gc, cfg: ModelConfig, shardings) -> dict:
    """The params GRPO starts from (and the frozen reference): config.grpo.init_from's
    checkpoint of step grpo.init_step (-1: the latest), placed on the mesh by the rules."""
    if not gc.init_from:
        raise ValueError(
            "grpo.init_from is empty: give the run directory of an SFT (or pretraining) run, "
            "e.g. --config.grpo.init_from=runs/sft"
        )
    if ckpt.read_model_config(gc.init_from) != cfg:
        raise ValueError(
            f"{gc.init_from} holds a model unlike config.model: train GRPO with the model "
            "config of that run (its model_config.json)"
        )
    step = None if gc.init_step < 0 else gc.init_step
    return ckpt.load_params(gc.init_from, step, shardings)[1]


def run(config: ml_collections.ConfigDict) -> dict:
    """GRPO as `config` says (configs/grpo.py); returns the last step's metrics."""
    tc, gc = config.train, config.grpo
    mesh = steps.train_mesh(config.mesh)
    tokenizer = make_tokenizer(config.data.tokenizer)
    cfg = ModelConfig.from_dict(config.model.to_dict())
    prompts, texts = read_prompts(config.data, tokenizer)
    reward = reward_fn(gc.reward)
    if gc.prompts_per_step > len(prompts):
        raise ValueError(
            f"grpo.prompts_per_step={gc.prompts_per_step} but {config.data.path} holds "
            f"{len(prompts)} prompts: lower it or add prompts"
        )
    splits = math.prod(mesh.shape[axis] for axis in rules.token_axes())
    if gc.prompts_per_step * gc.group_size % splits:
        raise ValueError(
            f"grpo.prompts_per_step x grpo.group_size = {gc.prompts_per_step * gc.group_size} "
            f"samples do not split over the {splits} devices of mesh axes {rules.token_axes()}: "
            f"make the product a multiple of {splits}"
        )

    optimizer = opt.make_optimizer(config.optimizer, tc.steps * gc.updates)
    state, shardings = steps.init_sharded_state(cfg, optimizer, tc.seed, mesh)
    start_params = initial_params(gc, cfg, shardings.params)
    # The reference stays the starting params; the policy is a separate copy being trained.
    reference = jax.tree.map(jnp.copy, start_params)
    opt_init = jax.jit(optimizer.init, out_shardings=shardings.opt_state)
    state = state.replace(params=start_params, opt_state=opt_init(start_params))

    order = grain.MapDataset.range(len(prompts)).shuffle(tc.seed).repeat()
    batches = iter(order.batch(gc.prompts_per_step, drop_remainder=True))
    primary = jax.process_index() == 0
    if primary:
        ckpt.write_run_info(tc.run_dir, cfg, config.data.tokenizer, config.to_dict())
    manager = ckpt.make_manager(tc.run_dir, tc.keep, tc.async_checkpoint)
    if manager.latest_step() is not None:
        state = ckpt.restore(manager, state, batches)
        tqdm.write(f"resumed {tc.run_dir} at update {int(state.step)}")

    setup = Setup(
        cfg=cfg,
        gc=gc,
        mesh=mesh,
        tokenizer=tokenizer,
        reward=reward,
        prompts=prompts,
        texts=texts,
        reference=reference,
        reference_logp=make_reference_fn(cfg, mesh, shardings.params, gc.max_new_tokens),
        update=make_update_step(cfg, optimizer, mesh, shardings, gc.clip_eps, gc.kl_coef),
    )
    log = MetricsLog(tc.run_dir) if primary else Silent()
    metrics: dict = {}
    try:
        for step in tqdm(range(int(state.step) // gc.updates + 1, tc.steps + 1), desc="grpo"):
            state, metrics = grpo_step(setup, state, next(batches), seed=tc.seed * 100_003 + step)
            if step % tc.log_every == 0 or step == tc.steps:
                log.write("train", step, metrics)
                tqdm.write(
                    f"step {step}: reward {metrics['reward_mean']:.3f} kl {metrics['kl']:.4f} "
                    f"sample {metrics['sample_s']:.1f}s learn {metrics['learn_s']:.1f}s"
                )
            if step % tc.save_every == 0 or step == tc.steps:
                ckpt.save(manager, state, batches)
    finally:
        log.close()
        manager.wait_until_finished()
        manager.close()
    return metrics
