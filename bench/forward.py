"""Forward-pass speed, ours (jitted JAX) against transformers' PyTorch DeepseekV2, same weights.

    python bench/forward.py                         # `small` preset, batch 8 x 512, fp32 CPU
    python bench/forward.py --batch 4 --seq 256 --repeats 3 --torch_attn eager

PyTorch runs with transformers' own defaults (SDPA attention, grouped_mm experts, as
`from_pretrained` picks them; the line printed names them) unless --torch_attn or
--torch_experts says otherwise. Random weights (initializer_range 0.02) are drawn for our model, written with `save_hf` and
read by transformers' `from_pretrained`, so both run the same numbers; the logits are compared
(within --atol at 95% of positions at least: see the router note below) before any time is
reported. Each side is timed --repeats times (at least 3) after a warm-up call (ours: the
compile), PyTorch under `torch.no_grad()`; min and median are printed, the ratio is of medians.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from timing import line, median, timed  # bench/timing.py: the script's folder is on sys.path

import deepseek_jax as dj
from deepseek_jax.sizes import param_counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(dj.config.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each (>= 3)")
    parser.add_argument("--torch_attn", choices=("sdpa", "eager"), help="default: transformers'")
    parser.add_argument(
        "--torch_experts", choices=("eager", "batched_mm", "grouped_mm"), help="default: theirs"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--atol", type=float, default=1e-3, help="logits agreement required")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = dj.preset(args.preset).replace(initializer_range=0.02)
    params = jax.jit(dj.init_params, static_argnames="cfg")(cfg=cfg, rng=jax.random.key(0))
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq))
    n_tokens = tokens.size
    with tempfile.TemporaryDirectory() as directory:
        dj.save_hf(directory, cfg, params)
        chosen = {"attn_implementation": args.torch_attn}
        chosen["experts_implementation"] = args.torch_experts
        torch_model = transformers.DeepseekV2ForCausalLM.from_pretrained(
            directory,
            dtype=torch.float32,
            **{k: v for k, v in chosen.items() if v is not None},  # None: transformers' default
        ).eval()

    forward = jax.jit(lambda p, t: dj.DeepSeekV2(cfg).apply({"params": p}, t).logits)
    start = time.perf_counter()
    ours = np.asarray(forward(params, tokens))
    compile_s = time.perf_counter() - start
    torch_tokens = torch.as_tensor(tokens)
    with torch.no_grad():
        theirs = torch_model(torch_tokens).logits.numpy()
    diff_BT = np.abs(ours - theirs).max(axis=-1)
    agree = float((diff_BT <= args.atol).mean())
    print(
        f"{args.preset}: {param_counts(cfg)['total'] / 1e6:.1f}M params, batch "
        f"{args.batch} x {args.seq} tokens, fp32, {args.threads} threads; logits within "
        f"{args.atol} at {agree:.2%} of positions, max |diff| {diff_BT.max():.2e} (first "
        f"call, with compile: {compile_s:.1f} s)"
    )
    # Where a token's router scores nearly tie, the two float orderings can pick different
    # experts: that position, and the later ones of its row that attend to it, then differ.
    if agree < 0.95:
        raise SystemExit(f"logits agree at only {agree:.2%} of positions: not timing")
    del ours, theirs

    ours_s = timed(lambda: forward(params, tokens).block_until_ready(), args.repeats)
    with torch.no_grad():
        torch_s = timed(lambda: torch_model(torch_tokens), args.repeats)
    attn = torch_model.config._attn_implementation
    experts = getattr(torch_model.config, "_experts_implementation", "?")
    label = f"transformers ({attn}, experts {experts})"
    for name, times in (("deepseek-jax (jit)", ours_s), (label, torch_s)):
        print(line(name, times, n_tokens))
    print(f"speed-up of ours over PyTorch (medians): {median(torch_s) / median(ours_s):.2f}x")


if __name__ == "__main__":
    main()
