"""The commands: thin layers that parse flags (parser.py, args.py) and call the library.

    deepseek-jax-train    = python -m deepseek_jax.cli.train
    deepseek-jax-sample   = python -m deepseek_jax.cli.sample
    deepseek-jax-prepare  = python -m deepseek_jax.cli.prepare
    deepseek-jax-convert  = python -m deepseek_jax.checkpoint.convert
    deepseek-jax-plan     = python -m deepseek_jax.parallel.plan

The last two live beside the library code they drive and share the flag style of parser.py.
"""
