"""SFT then GRPO on a verifiable task, on a 2-core CPU: a byte-level model learns a + b,
zero-padded and answering least-significant digit first ("012+039" -> "1500", the reversed
0051; reward "reversed_sum" in deepseek_jax.rl.rewards).

    python bench/addition_demo.py --out runs/addition

1. Writes the data: "a+b" user turns with the sum as the assistant's answer (a, b below
   10**digits), and two fixed sets of pairs never seen in training: validation and held-out.
2. SFT (deepseek_jax/configs/sft.py, `deepseek-jax-train --config sft`) from scratch, `--chunk`
   steps at a time. This task is learned in a sudden drop of the loss (from step ~200 in the
   runs measured; its step varies from run to run, threads reduce in varying order on the
   CPU), so SFT stops at the first chunk whose *validation* exact match reaches
   `--start_accuracy`: a middling model for GRPO to start from.
3. Exact match of that checkpoint on the held-out set: greedy answers scored by the reward.
4. GRPO (deepseek_jax/configs/grpo.py) from it, rewards from the same exact-match function.
5. Held-out exact match again; writes results.json and reward.png (reward per GRPO step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import deepseek_jax as dj  # noqa: E402
from deepseek_jax.checkpoint import orbax as ckpt  # noqa: E402
from deepseek_jax.configs import from_config_dict  # noqa: E402
from deepseek_jax.configs import grpo as grpo_config  # noqa: E402
from deepseek_jax.configs import sft as sft_config  # noqa: E402
from deepseek_jax.data.tokenizers import ByteTokenizer  # noqa: E402
from deepseek_jax.rl import grpo, rewards, sft  # noqa: E402
from deepseek_jax.train.metrics import read  # noqa: E402


def question(a: int, b: int, digits: int) -> str:
    return f"{a:0{digits}d}+{b:0{digits}d}"


def conversation(a: int, b: int, digits: int) -> dict:
    answer = str(a + b).zfill(digits + 1)[::-1]
    return {
        "messages": [
            {"role": "user", "content": question(a, b, digits)},
            {"role": "assistant", "content": answer},
        ]
    }


def write_data(out: str, digits: int, train: int, held_out: int, seed: int):
    """train.jsonl; returns the validation and held-out pairs, none of them in training."""
    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, 10**digits, size=(train + 2 * held_out, 2)).tolist()
    test = sorted({tuple(p) for p in pairs[:held_out]})
    valid = sorted({tuple(p) for p in pairs[held_out : 2 * held_out]} - set(test))
    unseen = set(test) | set(valid)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for a, b in pairs[2 * held_out :]:
            if (a, b) not in unseen:
                f.write(json.dumps(conversation(a, b, digits)) + "\n")
    return valid, test


def accuracy(run_dir: str, pairs: list[tuple], digits: int, step: int | None = None) -> float:
    """Exact match of greedy answers from the run's params at `step` (None: the latest)."""
    cfg, params = ckpt.load_params(run_dir, step)
    tok = ByteTokenizer()
    prompts = [
        tok.encode_chat(
            [{"role": "user", "content": question(a, b, digits)}], add_generation_prompt=True
        )
        for a, b in pairs
    ]
    new = np.asarray(dj.generate(cfg, params, prompts, max_new_tokens=8, eos=tok.eos_id))
    reward = rewards.reward_fn("reversed_sum")
    right = 0
    for (a, b), row in zip(pairs, new, strict=True):
        answer = tok.decode(
            row[: np.argmax(row == tok.eos_id)] if (row == tok.eos_id).any() else row
        )
        right += reward(question(a, b, digits), answer)
    return right / len(pairs)


def plot_rewards(run_dir: str, path: str) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    records = [r for r in read(run_dir) if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    mean = np.array([r["reward_mean"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, mean, label="reward mean (exact match of sampled answers)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("reward")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_sft(args, data: str, valid: list[tuple]):
    """SFT chunk by chunk until validation exact match reaches --start_accuracy. Returns the
    run directory, its step, the validation curve and the seconds taken."""
    start = time.perf_counter()
    cache = os.path.expanduser("~/.cache/deepseek_jax/xla")
    config = sft_config.get_config()
    config.data.path = data
    config.train.seed = args.seed
    config.train.run_dir = sft_dir = os.path.join(args.out, "sft")
    config.train.compilation_cache = cache
    # A constant rate after warmup (a cosine from the peak to the peak), so that extending
    # the run chunk by chunk (each sft.run resumes the last) is one run's schedule.
    config.optimizer.schedule = "cosine"
    config.optimizer.final_fraction = 1.0
    curve = {}
    for step in range(args.chunk, args.max_sft_steps + 1, args.chunk):
        config.train.steps = config.train.save_every = config.train.eval_every = step
        sft.run(from_config_dict(config))
        curve[step] = accuracy(sft_dir, valid, args.digits, step)
        print(f"SFT step {step}: validation exact match {curve[step]:.3f}", flush=True)
        if curve[step] >= args.start_accuracy:
            break
    else:
        sys.exit(f"no SFT checkpoint reached {args.start_accuracy}: raise --max_sft_steps")
    return sft_dir, step, curve, time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/addition")
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--train", type=int, default=30000)
    p.add_argument("--held_out", type=int, default=256)
    p.add_argument("--chunk", type=int, default=50)
    p.add_argument("--max_sft_steps", type=int, default=1000)
    p.add_argument("--start_accuracy", type=float, default=0.3)
    p.add_argument("--grpo_steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft_run", default="", help="skip SFT: start GRPO from this SFT run")
    p.add_argument("--sft_step", type=int, default=-1, help="with --sft_run: its checkpoint")
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "sft")):
        sys.exit(f"{args.out} holds an earlier run: give a fresh --out")
    os.makedirs(args.out, exist_ok=True)
    valid, held_out = write_data(args.out, args.digits, args.train, args.held_out, args.seed)
    data = os.path.join(args.out, "train.jsonl")

    if args.sft_run:  # GRPO from an earlier SFT run of this script's task and data
        sft_dir, step, curve, sft_s = args.sft_run, args.sft_step, {}, 0.0
    else:
        sft_dir, step, curve, sft_s = run_sft(args, data, valid)
    before = accuracy(sft_dir, held_out, args.digits, None if step < 0 else step)
    print(f"held-out exact match of SFT step {step}: {before:.3f}", flush=True)

    start = time.perf_counter()
    config = grpo_config.get_config()
    config.data.path = data
    config.train.steps = args.grpo_steps
    config.train.seed = args.seed
    config.train.run_dir = os.path.join(args.out, "grpo")
    config.grpo.init_from = sft_dir
    config.grpo.init_step = step
    grpo.run(from_config_dict(config))
    grpo_s = time.perf_counter() - start
    after = accuracy(config.train.run_dir, held_out, args.digits)
    print(f"held-out exact match after GRPO: {after:.3f}", flush=True)

    plot_rewards(config.train.run_dir, os.path.join(args.out, "reward.png"))
    records = [r for r in read(config.train.run_dir) if r["kind"] == "train"]
    results = {
        "held_out": len(held_out),
        "validation": len(valid),
        "digits": args.digits,
        "validation_exact_match_by_sft_step": curve,
        "grpo_started_from_sft_step": step,
        "exact_match_after_sft": before,
        "exact_match_after_grpo": after,
        "grpo_steps": args.grpo_steps,
        "sft_seconds": sft_s,
        "grpo_seconds": grpo_s,
        "grpo_sample_seconds": sum(r["sample_s"] for r in records),
        "grpo_learn_seconds": sum(r["learn_s"] for r in records),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
