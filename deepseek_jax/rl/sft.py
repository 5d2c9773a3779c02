"""Supervised fine-tuning on chat data: the pretraining loop (`deepseek_jax.train.loop`) on
rows of whole conversations (`deepseek_jax.data.chat`) whose loss weights cover only the
assistant's tokens, with the same grain pipeline, mesh, optimizer and checkpoints.

    deepseek-jax-train --config sft --config.data.path=chats.jsonl

Each conversation is rendered by the tokenizer's chat template (tokenizer_config.json's; the
byte tokenizer has DeepSeek-V2-Chat's built in) and packed with its own segment id, so
attention never crosses from one conversation into another.
"""

from __future__ import annotations

from deepseek_jax.errors import UserError
from deepseek_jax.train import loop
from deepseek_jax.train.settings import RunConfig


def run(config: RunConfig) -> dict:
    """SFT as `config` says (deepseek_jax/configs/sft.py); returns the last eval record."""
    if config.data.source != "chat":
        raise UserError(
            f"config.mode='sft' reads chat data, but data.source={config.data.source!r}: "
            "set --config.data.source=chat and data.path to a JSONL of {'messages': [...]}"
        )
    return loop.run(config)
