"""Generation speed and cache size, ours (`dj.generate`) against transformers' `generate`.

    python bench/generate.py                     # `small` preset, batch 8, 128 + 256 tokens, CPU
    python bench/generate.py --new 64 --runs 3 --torch_experts eager

Random weights (initializer_range 0.02) are drawn for our model, written with `save_hf` and
read by transformers' `from_pretrained`, so both sample from the same numbers. Both decode
greedily for exactly --new tokens (no eos) after the same random prompts of --prompt tokens;
tokens/s counts new tokens over the whole call (prefill included), median of --runs warm
runs (ours after compiling, PyTorch after a short warm-up call, under `torch.no_grad()`).
Cache bytes per token are measured on the caches each one actually holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

import deepseek_jax as dj
from deepseek_jax.generate.cache import expanded_bytes_per_token, nbytes
from deepseek_jax.generate.loop import prefill
from deepseek_jax.sizes import param_counts


def timed(fn, runs: int) -> tuple[float, float, object]:
    """(min, median) seconds of `runs` calls, and the last call's result."""
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def torch_cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers Cache holds (keys and values of each layer)."""
    return sum(
        t.numel() * t.element_size()
        for layer in cache.layers
        for t in (layer.keys, layer.values)
        if t is not None
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(dj.config.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length")
    parser.add_argument("--new", type=int, default=256, help="new tokens per row")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each (median)")
    parser.add_argument("--torch_attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument(
        "--torch_experts", default="grouped_mm", choices=("eager", "batched_mm", "grouped_mm")
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = dj.preset(args.preset).replace(initializer_range=0.02)
    params = jax.jit(dj.init_params, static_argnames="cfg")(cfg=cfg, rng=jax.random.key(0))
    prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.prompt))
    with tempfile.TemporaryDirectory() as directory:
        dj.save_hf(directory, cfg, params)
        torch_model = transformers.DeepseekV2ForCausalLM.from_pretrained(
            directory,
            dtype=torch.float32,
            attn_implementation=args.torch_attn,
            experts_implementation=args.torch_experts,
        ).eval()
    new_tokens = args.batch * args.new

    def ours():
        return np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=args.new))

    start = time.perf_counter()
    ours()
    compile_s = time.perf_counter() - start
    ours_min, ours_s, ours_tokens = timed(ours, args.runs)

    input_ids = torch.as_tensor(prompts)
    greedy = dict(
        attention_mask=torch.ones_like(input_ids),
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        return_dict_in_generate=True,
    )

    def theirs(n=args.new):
        with torch.no_grad():
            return torch_model.generate(input_ids, max_new_tokens=n, min_new_tokens=n, **greedy)

    theirs(2)
    theirs_min, theirs_s, out = timed(theirs, args.runs)
    theirs_tokens = out.sequences[:, args.prompt :].numpy()

    slots = args.prompt + args.new
    _, cache = jax.jit(prefill, static_argnames=("cfg", "cache_len"))(
        cfg, params, prompts, np.full(args.batch, args.prompt), cache_len=slots
    )
    ours_bpt = nbytes(cache) / (args.batch * slots)
    theirs_bpt = torch_cache_bytes(out.past_key_values) / (
        args.batch * out.past_key_values.get_seq_length()
    )
    expanded_bpt = expanded_bytes_per_token(cfg, "float32")
    agree = (ours_tokens == theirs_tokens).cumprod(axis=1).sum(axis=1)

    print(
        f"{args.preset}: {param_counts(cfg)['total'] / 1e6:.1f}M params, batch "
        f"{args.batch}, {args.prompt}-token prompts, {args.new} new tokens, fp32, "
        f"{args.threads} threads (our first call, compile included: {compile_s:.1f} s)"
    )
    print(f"{'':24s}{'tokens/s':>12s}{'min s':>10s}{'median s':>10s}{'cache bytes/token':>20s}")
    row = f"{new_tokens / ours_s:12.1f}{ours_min:10.2f}{ours_s:10.2f}{ours_bpt:20,.0f}"
    print(f"{'deepseek-jax':24s}{row}")
    label = f"transformers ({args.torch_experts})"
    row = f"{new_tokens / theirs_s:12.1f}{theirs_min:10.2f}{theirs_s:10.2f}{theirs_bpt:20,.0f}"
    print(f"{label:24s}{row}")
    print(f"{'expanded per-head K/V':24s}{'':32s}{expanded_bpt:20,}")
    print(
        f"throughput ratio {theirs_s / ours_s:.2f}x; our cache is "
        f"{ours_bpt / expanded_bpt:.4f} of an expanded one "
        f"((r_kv + dr) / (H (dn + dr + dv)) = {cfg.latent_cache_dim / cfg.expanded_cache_dim:.4f});"
        f" greedy tokens agree for the first {agree.min()}-{agree.max()} of {args.new} per row"
    )


if __name__ == "__main__":
    main()
