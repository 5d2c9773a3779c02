r"""deepseek-jax-sample (= python -m deepseek_jax.cli.sample = python sample.py): sample from a
DeepSeek-V2 checkpoint, streaming tokens as they are made.

    deepseek-jax-sample --checkpoint runs/default --prompt "def fib(n):"
    deepseek-jax-sample --checkpoint path/to/DeepSeek-V2-Lite-Chat --chat --prompt "Hi!" \
        --temperature 0.7 --top_p 0.9
    deepseek-jax-sample --checkpoint deepseek-ai/DeepSeek-V2-Lite-Chat --chat --prompt "Hi!" \
        --mesh expert=8 --dtype bfloat16

--checkpoint is an HF directory (config.json + safetensors, with tokenizer.json and
tokenizer_config.json for its tokenizer and chat template), a hub id, or a train.py run
directory[:step] (orbax; its tokenizer files if it was trained with one, else bytes).
--mesh shards the params (read straight onto the devices) and the batch over local devices.
Greedy with --temperature 0.
"""

import argparse
import sys
import time

import jax

import deepseek_jax as dj
from deepseek_jax.checkpoint import split_step
from deepseek_jax.checkpoint.hub import local_dir
from deepseek_jax.cli import args as cli_args
from deepseek_jax.cli.parser import Parser
from deepseek_jax.data.tokenizers import ByteTokenizer, TextStream, load_tokenizer
from deepseek_jax.errors import UserError, report_errors
from deepseek_jax.generate.cache import describe
from deepseek_jax.parallel.mesh import parse_mesh

PROG = "deepseek-jax-sample"


def parse(argv=None) -> argparse.Namespace:
    p = Parser(PROG, __doc__)
    p.add_argument(
        "--checkpoint", required=True, help="HF checkpoint dir, hub id, or train.py run dir[:step]"
    )
    p.add_argument("--prompt", default="", help="text to continue (with --chat: the user turn)")
    p.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    p.add_argument("--system", help="with --chat: a system message before the user turn")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore_eos", action="store_true", help="always make --max_new_tokens")
    p.add_argument("--mesh", help="e.g. expert=8 or data=2,expert=4: shard over local devices")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="params (default: as saved)")
    return cli_args.parse(p, argv)[0]


def prompt_ids(args, tokenizer) -> list[int]:
    if not args.chat:
        ids = tokenizer.encode(args.prompt)
        if not ids:
            raise UserError("--prompt is empty and the tokenizer adds no bos: give some text")
        return ids
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.prompt})
    try:
        return tokenizer.encode_chat(messages)
    except ValueError as e:  # the checkpoint's template refused the messages
        raise UserError(f"--chat: {e}") from e


def make_mesh(flag: str | None):
    if not flag:
        return None
    try:
        return dj.make_mesh(**parse_mesh(flag))
    except ValueError as e:
        raise UserError(f"--mesh {flag}: {e}") from None


def load(args):
    """(cfg, params, tokenizer, mesh) for --checkpoint, refusing a byte tokenizer (no
    tokenizer files beside the weights) for a model whose vocabulary is not the 256 bytes."""
    mesh = make_mesh(args.mesh)
    try:  # the path is the user's: a missing or malformed checkpoint is theirs to fix
        cfg, params = dj.load_checkpoint(args.checkpoint, dtype=args.dtype, mesh=mesh)
        tokenizer = load_tokenizer(local_dir(split_step(args.checkpoint)[0]))
    except UserError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--checkpoint {args.checkpoint}: {e}") from e
    if isinstance(tokenizer, ByteTokenizer) and cfg.vocab_size != ByteTokenizer.vocab_size:
        raise UserError(
            f"{args.checkpoint} has no tokenizer.json and a vocabulary of {cfg.vocab_size}, not "
            "the 256 bytes: copy the tokenizer files of the model it came from beside it"
        )
    if mesh is None:  # one device: generate on per-layer params, one copy of the weights
        params = dj.unstack_params(cfg, params, delete=True)
    return cfg, params, tokenizer, mesh


@report_errors(PROG)
def main(argv=None) -> None:
    args = parse(argv)
    cfg, params, tokenizer, mesh = load(args)
    ids = prompt_ids(args, tokenizer)
    eos = None if args.ignore_eos else tokenizer.eos_id
    if eos is None and not args.ignore_eos and cfg.eos_token_id is not None:
        eos = cfg.eos_token_id if cfg.eos_token_id < cfg.vocab_size else None

    text, times, made = TextStream(tokenizer), [], []

    def show(step, tokens_B):
        if not times:  # the prompt waits for the checks in generate, so errors come first
            print(tokenizer.decode(ids) if args.chat else args.prompt, end="", flush=True)
        times.append(time.perf_counter())
        token = int(tokens_B[0])
        if made and made[-1] == eos:
            return
        made.append(token)
        if token != eos:
            print(text.push(token), end="", flush=True)

    start = time.perf_counter()
    try:
        dj.generate(
            cfg,
            params,
            [ids],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos=eos,
            stream=show,
            mesh=mesh,
        ).block_until_ready()
    except UserError:
        raise
    except ValueError as e:  # generate's checks of the arguments (prompt length, top_p, ...)
        raise UserError(str(e)) from e
    jax.effects_barrier()  # the last stream callbacks
    print()
    decode = f"{(len(times) - 1) / (times[-1] - times[0]):.1f} tokens/s" if len(times) > 1 else ""
    print(
        f"--- {len(made)} tokens; first after {times[0] - start:.2f} s (compile + prefill of "
        f"{len(ids)}), then {decode}\n--- {describe(cfg, 1, len(ids) + args.max_new_tokens)}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
