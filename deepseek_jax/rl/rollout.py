"""GRPO's rollouts: G sampled answers to each prompt, laid out for teacher forcing on the mesh.

Legend: P prompts a step, G samples per prompt, B = P * G, L = longest prompt + N sequence
positions, N new tokens.

Answers are sampled with `deepseek_jax.generate` from the state being trained, on the same
mesh and params (docs/design.md 5), then gathered to every process's host (rewards are Python
functions of the decoded text) and placed back on the mesh, each process its own rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import chat
from deepseek_jax.errors import UserError
from deepseek_jax.generate.loop import generate
from deepseek_jax.parallel import rules


@struct.dataclass
class Rollout:
    """B = P * G sampled answers laid out for teacher forcing, every field [B, ...]."""

    tokens: jnp.ndarray  # [B, L] prompt then answer, zero after
    starts: jnp.ndarray  # [B] index of the answer's first token in `tokens`
    answer_mask: jnp.ndarray  # [B, N] 1 up to and including eos
    # [B, N] pi_old's log-probs: read only after the first update, which computes them (its
    # `logp` output) in the update's own forward; zeros before.
    old_logp: jnp.ndarray
    ref_logp: jnp.ndarray  # [B, N] the frozen reference's
    advantages: jnp.ndarray  # [B]
    first_update: jnp.ndarray  # bool scalar: pi_old is the policy being updated


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


def last_user_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation up to its last user message, and that message's text."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise UserError(
            f"a GRPO prompt needs a user message; got roles {[m['role'] for m in messages]}: "
            "give every conversation of data.path a user turn"
        )
    return messages[: users[-1] + 1], messages[users[-1]]["content"]


def read_prompts(path: str, messages_field: str, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Each conversation of the chat JSONL up to its last user turn: ids with the generation
    prompt, and the user's text (what rewards read). Assistant answers in the file are unused."""
    ids, texts = [], []
    for messages in chat.read_conversations(path, messages_field):
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


def replicated(mesh: Mesh, value) -> jax.Array:
    """A scalar every device of every process holds (a global array, as a multi-process jit
    needs its inputs)."""
    scalar = np.asarray(value)
    return jax.make_array_from_callback((), NamedSharding(mesh, P()), lambda _: scalar)


def sample_answers(
    cfg: ModelConfig,
    params,
    prompts: list[list[int]],
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    eos: int | None,
    mesh: Mesh,
    seed: int,
) -> np.ndarray:
    """G answers to each prompt, tokens [B, N], on the host of every process."""
    repeated = [p for p in prompts for _ in range(group_size)]
    new = generate(
        cfg, params, repeated, max_new_tokens, temperature=temperature, seed=seed, eos=eos,
        mesh=mesh,
    )  # fmt: skip
    return on_host(new)


def score(reward, texts: list[str], answers: list[str], group: int) -> np.ndarray:
    """Rewards [P, G]: answer b answers prompt b // G."""
    return np.array(
        [reward(texts[b // group], a) for b, a in enumerate(answers)], np.float32
    ).reshape(-1, group)
