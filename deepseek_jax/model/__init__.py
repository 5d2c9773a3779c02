"""Pure Flax Linen modules for DeepSeek-V2: rope, mla, moe, transformer."""
