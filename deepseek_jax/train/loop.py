"""The training loop: data, state, steps, eval, metrics, checkpoints, resume.

    summary = run(config)      # config: a train.settings.RunConfig

Resumes from the newest checkpoint in `train.run_dir` that restores completely
(`train.context.RunContext`): params, optimizer state, step, RNG and the data iterator come
back exactly, so a resumed run matches a straight one bit for bit. A NaN or Inf loss, and a
checkpoint that fails to save, stop the run with one line that says what to do.
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
from tqdm import tqdm

from deepseek_jax.config import ModelConfig
from deepseek_jax.data import pipeline
from deepseek_jax.errors import UserError
from deepseek_jax.parallel import rules
from deepseek_jax.train import optimizer as opt
from deepseek_jax.train import schedule
from deepseek_jax.train import step as steps
from deepseek_jax.train.context import RunContext
from deepseek_jax.train.settings import RunConfig


class NonFiniteLossError(UserError):
    """The loss or gradient norm became NaN or infinite: the message names the last good
    checkpoint and the settings to change."""


def model_config(config: RunConfig, vocab_size: int) -> ModelConfig:
    """The run's model, once checked against the tokenizer's vocabulary."""
    cfg = config.model
    if cfg.vocab_size < vocab_size:
        raise UserError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {vocab_size}: "
            f"set --config.model.vocab_size={vocab_size}"
        )
    return cfg


def unigram_nats(train_rows, eval_ds, vocab_size: int, sample: int = 4096) -> float:
    """Held-out cross-entropy (nats/token) of add-one unigram frequencies from training rows:
    the score of a model that ignores context, the bar a trained model must clear."""
    stride = max(1, len(train_rows) // sample)
    counts = np.ones(vocab_size)
    for i in range(0, len(train_rows), stride):
        counts += np.bincount(np.asarray(train_rows[i][0]), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts / counts.sum())
    nll, n = 0.0, 0.0
    for batch in eval_ds:
        nll -= (logp[batch["targets"]] * batch["weights"]).sum()
        n += batch["weights"].sum()
    return nll / n


def evaluate(eval_step, params, eval_ds, mesh) -> float:
    """Mean held-out nll per target token (nats)."""
    nll, count = 0.0, 0.0
    for batch in eval_ds:
        batch_nll, batch_count = eval_step(params, steps.global_batch(mesh, batch))
        nll, count = nll + float(batch_nll), count + float(batch_count)
    return nll / count


def eval_record(loss: float, tokenizer: str) -> dict:
    record = {"eval_loss": loss}
    if tokenizer == "byte":  # one token is one byte
        record["eval_bits_per_byte"] = loss / math.log(2)
    return record


def run(config: RunConfig) -> dict:
    """Trains as `config` says; returns the last eval record (and the unigram baseline)."""
    config, plan = schedule.resolve(config)  # train.steps from train.tokens; the batch ramp
    with RunContext(config.train, config.mesh) as context:
        return train_loop(config, plan, context)


def train_loop(config: RunConfig, plan: schedule.Plan, context: RunContext):
    train, mesh = config.train, context.mesh
    schedule.check_batches(plan, train.micro_steps, rules.token_devices(mesh), jax.process_count())
    local_batch = train.batch_size // jax.process_count()  # whole: checked just above
    seq_len = config.data.seq_len
    rows, tokenizer = pipeline.row_datasets(config.data, seq_len)
    shard, shards = jax.process_index(), jax.process_count()
    local_batches = plan.batches.per_process(shards)  # one compile of the step per size
    train_ds = pipeline.train_batches(rows["train"], local_batches, train.seed, shard, shards)
    eval_ds = pipeline.eval_batches(rows["eval"], local_batch, train.eval_batches, shard, shards)
    final_eval_ds = pipeline.eval_batches(rows["eval"], local_batch, 0, shard, shards)
    cfg = model_config(config, pipeline.make_tokenizer(tokenizer).vocab_size)
    baseline = unigram_nats(rows["train"], final_eval_ds, cfg.vocab_size)

    optimizer = opt.make_optimizer(config.optimizer, plan)
    state, shardings = steps.init_sharded_state(cfg, optimizer, train.seed, mesh)
    data_iter = iter(train_ds)
    # Resumes from the run's own newest good checkpoint, else starts from train.init_from.
    state = context.start(cfg, tokenizer, config.to_dict(), state, data_iter)

    train_step = steps.make_train_step(
        cfg, optimizer, opt.schedule(config.optimizer, plan), mesh, shardings, train.micro_steps
    )
    eval_step = steps.make_eval_step(cfg, mesh, shardings.params)
    tqdm.write(
        f"unigram baseline: {baseline:.3f} nats/token"
        + (f" = {baseline / math.log(2):.3f} bits/byte" if tokenizer == "byte" else "")
    )
    result = {"unigram_loss": baseline}
    start = int(state.step)
    bar = tqdm(
        total=train.steps,
        initial=start,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not context.primary,
    )
    clock, clock_step = time.perf_counter(), start
    with bar:
        for step in range(start + 1, train.steps + 1):
            batch = steps.global_batch(mesh, next(data_iter))
            state, metrics = train_step(state, batch)
            metrics = jax.device_get(metrics)
            check_finite(metrics, step, context)
            context.check()
            bar.update(1)
            if step % train.log_every == 0 or step == train.steps:
                now = time.perf_counter()
                rate = (plan.tokens_after(step) - plan.tokens_after(clock_step)) / (now - clock)
                clock, clock_step = now, step
                context.log.write("train", step, {**metrics, "tokens_per_s": rate})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:,.0f}")
            if step % train.save_every == 0 or step == train.steps:
                context.save(state, data_iter)
            if step % train.eval_every == 0 or step == train.steps:
                # The last eval covers the whole held-out split: the figure a run reports.
                split = final_eval_ds if step == train.steps else eval_ds
                record = eval_record(evaluate(eval_step, state.params, split, mesh), tokenizer)
                context.log.write("eval", step, record)
                result.update(record, step=step)
                tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
                clock = time.perf_counter()  # eval time is not training throughput
    return result


def check_finite(metrics: dict, step: int, context: RunContext) -> None:
    """Stops before a non-finite state is saved: the last checkpoint stays a good one."""
    if np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]):
        return
    raise NonFiniteLossError(
        f"loss {metrics['loss']}, gradient norm {metrics['grad_norm']} at step {step}: "
        f"stopped; the last good checkpoint is step {context.latest_step()} in "
        f"{context.settings.run_dir}. Lower optimizer.learning_rate or raise "
        "optimizer.warmup_steps, then run again to resume from it"
    )
