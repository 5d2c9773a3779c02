"""Alignment: SFT and GRPO on the training mesh."""
