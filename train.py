"""Train DeepSeek-V2 from a checkout: the same command as `deepseek-jax-train` (installed) and
`python -m deepseek_jax.cli.train`; see deepseek_jax/cli/train.py for the flags.

    python train.py                                   # the default job -> runs/default
    python train.py --config tiny --config.train.steps=200
"""

from deepseek_jax.cli.train import main

if __name__ == "__main__":
    main()
