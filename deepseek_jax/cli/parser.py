"""The one flag style of every command: `--name=value` (or `--name value`) with underscores.

argparse with abbreviations off (absl's flags, which train.py used, take neither abbreviations
nor dashes, so one spelling works everywhere); a bad flag is a UserError (one line on stderr,
exit 2, see deepseek_jax/errors.py) and `--debug` shows the traceback instead. A leaf module:
the commands inside the library (checkpoint/convert.py, parallel/plan.py, ...) import it.
"""

from __future__ import annotations

import argparse

from deepseek_jax.errors import UserError


class Parser(argparse.ArgumentParser):
    """argparse with underscored flags, no abbreviations, and errors as one UserError line."""

    def __init__(self, prog: str, doc: str):
        super().__init__(
            prog=prog,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        self.add_argument(
            "--debug",
            action="store_true",
            help="on an error, show the traceback (also DEEPSEEK_JAX_DEBUG=1)",
        )

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
