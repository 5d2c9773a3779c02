"""The experiment config on the command line (flags in the one style of cli/parser.py).

Commands that run an experiment take

    --config NAME_OR_FILE          a config of deepseek_jax/configs (by name) or a .py file
    --config.<section>.<field>=V   override one field; V is parsed as the field's type
    --print_config                 print every field with its value and description, exit

The overrides are applied here rather than by absl/ml-collections' config_flags, which reads
sys.argv while its flag is being defined and reports a mistyped field as a multi-line
traceback.
"""

from __future__ import annotations

import ast
import difflib
import sys

import ml_collections

from deepseek_jax import configs
from deepseek_jax.cli.fields import FIELDS
from deepseek_jax.cli.parser import Parser
from deepseek_jax.errors import UserError

CONFIG_FLAG = "--config"


def add_config_flags(parser: Parser, default: str = "default") -> None:
    parser.add_argument(
        CONFIG_FLAG,
        default=default,
        metavar="NAME_OR_FILE",
        help=f"a config by name ({', '.join(configs.names())}) or a .py file with "
        f"get_config() (default {default}); override fields with --config.<section>.<field>=V",
    )
    parser.add_argument(
        "--print_config",
        action="store_true",
        help="print every field of the resolved config, its value and what it means; exit",
    )


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """argv -> ([(dotted field, text)], the other arguments), in order."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(CONFIG_FLAG + "."):
            name, eq, text = arg[len(CONFIG_FLAG) + 1 :].partition("=")
            if not eq:
                if i + 1 == len(argv):
                    raise UserError(f"{arg} needs a value: write {arg}=VALUE")
                i, text = i + 1, argv[i + 1]
            overrides.append((name, text))
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def parse_value(field: str, current, text: str):
    """`text` read as the type of the field's current value (None: a Python literal or str)."""
    if text in ("None", "none") and not isinstance(current, str):
        return None
    try:
        if isinstance(current, bool):
            words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            return words[text.lower()]
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        if isinstance(current, ml_collections.ConfigDict):
            raise ValueError
        return ast.literal_eval(text)
    except (KeyError, ValueError, SyntaxError):
        if current is None:
            return text  # an unset field takes any literal, else the text itself
        kind = type(current).__name__
        raise UserError(
            f"--config.{field}={text!r}: not of type {kind} (the field holds {current!r})"
        ) from None


def apply_override(config: ml_collections.ConfigDict, field: str, text: str) -> None:
    node, path = config, field.split(".")
    for depth, name in enumerate(path):
        where = ".".join(path[:depth])
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserError(f"--config.{field}: config.{where} is {node!r}, not a section")
        if name not in node:
            near = difflib.get_close_matches(name, list(node.keys()), n=1)
            hint = f"did you mean {'.'.join([*path[:depth], near[0]])}?" if near else ""
            raise UserError(
                f"--config.{field}: config{'.' + where if where else ''} has no field {name!r}; "
                f"{hint or 'see --print_config for the fields'}"
            )
        if depth < len(path) - 1:
            node = node[name]
    with node.unlocked():
        node[path[-1]] = parse_value(field, node[path[-1]], text)


def resolve(name_or_path: str, overrides: list[tuple[str, str]]) -> ml_collections.ConfigDict:
    """The config `--config` names with every `--config.x.y=v` applied, then locked."""
    config = configs.load(name_or_path)
    for field, text in overrides:
        apply_override(config, field, text)
    config.lock()
    return config


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def print_config(config: ml_collections.ConfigDict, file=None) -> None:
    """Every field: `section.field = value  # description`."""
    rows = [(f"{name} = {value!r}", FIELDS.get(name, "")) for name, value in flatten(config)]
    width = max(len(left) for left, _ in rows)
    for left, about in rows:
        print(f"{left:{width}s}  # {about}" if about else left, file=file or sys.stdout)


def parse(parser: Parser, argv: list[str] | None, with_config: bool = False):
    """(args, config or None): flags parsed, the config resolved when the command has one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides, rest = split_overrides(argv) if with_config else ([], argv)
    args = parser.parse_args(rest)
    if not with_config:
        return args, None
    return args, resolve(args.config, overrides)
