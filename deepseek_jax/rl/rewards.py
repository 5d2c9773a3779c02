"""GRPO's rewards: functions of (prompt text, completion text), chosen by name in the config.

@register_reward("my_task")
def my_task(prompt: str, completion: str) -> float: ...
deepseek-jax-train --config grpo --config.grpo.reward=my_task
"""

from __future__ import annotations

import re
from collections.abc import Callable

from deepseek_jax.errors import UserError

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
        raise UserError(
            f"grpo.reward={name!r} is not registered: choose one of {sorted(REWARDS)} or "
            "register one with @deepseek_jax.rl.rewards.register_reward(name)"
        )
    return REWARDS[name]


# The task of bench/addition_demo.py, registered here because configs/grpo.py names it as
# its default reward (a config must not depend on importing a benchmark).
@register_reward("reversed_sum")
def reversed_sum(prompt: str, completion: str) -> float:
    """1 if the completion is the sum asked for by a prompt "a+b" in one more digit than the
    longer operand, zero-padded and least-significant digit first ("012+039" -> "1500"), else 0.
    In that fixed layout (minGPT's adder writes sums backwards too) each answer digit depends
    on the operand digits at a fixed offset and the carry it has just written: a task a small
    model learns in minutes on a CPU (bench/addition_demo.py)."""
    match = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", prompt)
    if match is None:
        raise UserError(
            f"reward 'reversed_sum' needs prompts like '12+34', got {prompt!r}: "
            "use prompts of that form or another grpo.reward"
        )
    width = max(len(match[1]), len(match[2])) + 1
    return float(completion.strip() == str(int(match[1]) + int(match[2])).zfill(width)[::-1])
