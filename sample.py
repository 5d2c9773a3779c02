"""Sample from a checkout: the same command as `deepseek-jax-sample` (installed) and
`python -m deepseek_jax.cli.sample`; see deepseek_jax/cli/sample.py for the flags.

    python sample.py --checkpoint runs/default --prompt "def fib(n):"
"""

from deepseek_jax.cli.sample import main

if __name__ == "__main__":
    main()
