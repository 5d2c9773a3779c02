"""The experiment configs shipped with the package, selectable by name or by file.

Each module here has `get_config()` returning an ml-collections ConfigDict that starts from
`deepseek_jax.train.defaults.base_config`. Commands take `--config NAME` (a module of this
folder: `default`, `tiny`, `v2_lite`, ...) or `--config path/to/file.py` (any file with a
`get_config()`), so a pip or git install runs every experiment without the repository.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import ml_collections

from deepseek_jax.errors import UserError

FOLDER = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
    """The configs shipped in this folder."""
    return sorted(n[:-3] for n in os.listdir(FOLDER) if n.endswith(".py") and not n.startswith("_"))


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a shipped config (by name) or of a .py file (by path)."""
    if name_or_path in names():
        module = importlib.import_module(f"{__name__}.{name_or_path}")
    elif name_or_path.endswith(".py") and os.path.isfile(name_or_path):
        module_name = "_config_" + os.path.basename(name_or_path)[:-3]
        spec = importlib.util.spec_from_file_location(module_name, name_or_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        raise UserError(
            f"--config {name_or_path!r}: not a config of the package ({', '.join(names())}) "
            "nor a .py file with get_config()"
        )
    if not hasattr(module, "get_config"):
        raise UserError(f"--config {name_or_path!r}: the file defines no get_config()")
    return module.get_config()
