"""Hub ids wherever a checkpoint path is taken: "deepseek-ai/DeepSeek-V2-Lite-Chat" -> a local
snapshot directory, through `huggingface_hub` (its cache, HF_HUB_CACHE / HF_HOME, and offline
mode, HF_HUB_OFFLINE=1, are honoured as everywhere else in the HF stack).

    directory = local_dir("deepseek-ai/DeepSeek-V2-Lite-Chat")   # or a path: returned as is
"""

from __future__ import annotations

import os
import re

from deepseek_jax.errors import UserError

# owner/name as the hub spells them; anything else is a path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model needs from a repository: config, weights (safetensors preferred), tokenizer.
PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer.model",
]


def local_dir(source: str | os.PathLike) -> str:
    """A directory path for `source`: an existing directory, or a hub id's snapshot."""
    path = os.fspath(source)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise UserError(f"{path} is a file: give a checkpoint directory or a hub id (owner/name)")
    if not HUB_ID.match(path):
        raise UserError(f"{path} does not exist and is not a hub id (owner/name): check the path")
    import huggingface_hub  # noqa: PLC0415  (only for hub ids)
    from huggingface_hub.errors import HfHubHTTPError  # noqa: PLC0415

    try:
        directory = huggingface_hub.snapshot_download(path, allow_patterns=PATTERNS)
    except (HfHubHTTPError, OSError) as e:  # LocalEntryNotFoundError is an OSError
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        fix = (
            "HF_HUB_OFFLINE is set and the cache lacks it: download it online first"
            if offline
            else "check the id (and HF_TOKEN for a gated repository) or the network"
        )
        raise UserError(
            f"{path!r} is no local directory, and the hub did not give it "
            f"({type(e).__name__}): {fix}"
        ) from None
    return directory
