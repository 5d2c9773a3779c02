"""The run's plan: batch size and tokens of every step, and the learning rate by tokens.

Paper 3.2.1: the batch ramps from 2304 to 9216 sequences over the first 225B tokens, the rate
warms up linearly over 2000 steps, then is multiplied by 0.316 after about 60% and again
after about 90% of the training TOKENS. With a ramping batch, steps and tokens are not
proportional, so every point of the schedule is placed by tokens and turned into a step here,
once, on the host.

    config, plan = resolve(config)    # a RunConfig; train.steps filled in (from train.tokens)
    plan.batches.at(step)             # sequences in step `step` (steps count from 1)
    lr = learning_rate(config.optimizer, plan)   # an optax schedule of the update count

The ramp is a staircase of `train.ramp_stages` sizes, ramp_start + i (final - ramp_start) /
ramp_stages, each trained for an equal share of `train.ramp_tokens`, then `train.batch_size`.
Each distinct size is one more compile of the train step, so keep the stages few.

    python -m deepseek_jax.train.schedule --config v2                # prints the plan
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax

from deepseek_jax.data.pipeline import BatchSizes
from deepseek_jax.errors import UserError, report_errors
from deepseek_jax.train.settings import OptimizerSettings, RunConfig, TrainSettings

SCHEDULES = ("step", "cosine")


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's length and batch sizes. `tokens_after(s)`: tokens trained by the end of step s."""

    seq_len: int
    steps: int
    batches: BatchSizes

    @classmethod
    def fixed(cls, steps: int) -> Plan:
        """`steps` steps at one batch size (tokens are proportional to steps)."""
        return cls(seq_len=1, steps=steps, batches=BatchSizes((1,)))

    def tokens_after(self, step: int) -> int:
        return self.batches.before(step + 1) * self.seq_len

    @property
    def tokens(self) -> int:
        return self.tokens_after(self.steps)

    def step_reaching(self, tokens: float) -> int:
        """The first step by whose end `tokens` tokens have been trained (0 for tokens <= 0)."""
        sizes, starts = self.batches.sizes, self.batches.starts
        for i, (size, start) in enumerate(zip(sizes, starts, strict=True)):
            done = self.tokens_after(start - 1)
            step = start - 1 + max(0, math.ceil((tokens - done) / (size * self.seq_len)))
            if i + 1 == len(starts) or step < starts[i + 1]:
                return step
        raise AssertionError("unreachable: the last stage never ends")

    def tokens_after_jnp(self, count: jnp.ndarray) -> jnp.ndarray:
        """`tokens_after` of a traced step count, in float32 (for a schedule's smooth parts)."""
        ends = self.batches.starts[1:] + (None,)
        total = jnp.zeros((), jnp.float32)
        for size, start, end in zip(self.batches.sizes, self.batches.starts, ends, strict=True):
            done = jnp.maximum(count - (start - 1), 0)
            if end is not None:
                done = jnp.minimum(done, end - start)
            total = total + done.astype(jnp.float32) * float(size * self.seq_len)
        return total


def ramp(train_cfg: TrainSettings, seq_len: int) -> BatchSizes:
    """`train.ramp_*` -> the batch size of every step (one stage if the ramp is off)."""
    start, tokens, stages = train_cfg.ramp_start, train_cfg.ramp_tokens, train_cfg.ramp_stages
    final = train_cfg.batch_size
    if start == 0:
        return BatchSizes((final,))
    if not 0 < start < final:
        raise UserError(
            f"train.ramp_start={start} must lie in (0, train.batch_size={final}): lower it, "
            "or set it to 0 for a fixed batch"
        )
    if stages < 1 or tokens <= 0:
        raise UserError(
            f"train.ramp_stages={stages}, train.ramp_tokens={tokens}: give at least one stage "
            "and a positive token count"
        )
    sizes = [start + i * (final - start) // stages for i in range(stages)] + [final]
    starts, done = [1], 0
    for i, size in enumerate(sizes[:-1]):
        steps = math.ceil((tokens * (i + 1) / stages - done) / (size * seq_len))
        if steps < 1:
            raise UserError(
                f"train.ramp_tokens={tokens} gives stage {i + 1} of {stages} less than one "
                f"step of {size} x {seq_len} tokens: raise it or lower train.ramp_stages"
            )
        done += steps * size * seq_len
        starts.append(starts[-1] + steps)
    return BatchSizes(tuple(sizes), tuple(starts))


def make_plan(config: RunConfig) -> Plan:
    """The plan of `config`, from its fields alone; every schedule field checked."""
    tc, seq_len = config.train, config.data.seq_len
    if (tc.tokens > 0) == (tc.steps > 0):
        raise UserError(
            f"train.steps={tc.steps} and train.tokens={tc.tokens}: give the run's length by "
            "exactly one of them (set the other to 0)"
        )
    batches = ramp(tc, seq_len)
    steps = tc.steps or Plan(seq_len, 0, batches).step_reaching(tc.tokens)
    plan = Plan(seq_len, steps, batches)
    if batches.starts[-1] > steps:
        raise UserError(
            f"train.ramp_tokens={tc.ramp_tokens} ends at step {batches.starts[-1]}, "
            f"past the run's last step {steps} ({plan.tokens:,} tokens): lower it or "
            "lengthen the run"
        )
    learning_rate(config.optimizer, plan)  # checks the optimizer's schedule fields
    return plan


def resolve(config: RunConfig) -> tuple[RunConfig, Plan]:
    """`config` with `train.steps` the run's step count, and its plan. Also checks
    that a run which continues another (`train.continues`) names it in `train.init_from`."""
    plan = make_plan(config)
    if config.train.continues and not config.train.init_from:
        raise UserError(
            f"train.init_from is empty, but this config continues {config.train.continues}: "
            "set --config.train.init_from=RUN_DIR (the run to start from)"
        )
    return config.replace(train=dataclasses.replace(config.train, steps=plan.steps)), plan


def check_batches(plan: Plan, micro_steps: int, splits: int, processes: int) -> None:
    """Every batch size of the plan must split into `micro_steps` micro-batches, each over the
    `splits` devices of the mesh's token axes, and evenly over the processes."""
    multiple = micro_steps * math.lcm(splits, processes)
    for size, start in zip(plan.batches.sizes, plan.batches.starts, strict=True):
        if size % multiple:
            raise UserError(
                f"the batch of {size} sequences from step {start} does not split into "
                f"train.micro_steps={micro_steps} micro-batches over {processes} process(es) and "
                f"the {splits} devices that split tokens: make train.batch_size and every "
                f"size of the train.ramp_* ramp a multiple of {multiple}"
            )


def decay_steps(opt_cfg: OptimizerSettings, plan: Plan) -> tuple[int, ...]:
    """The update counts from which the rate is multiplied by decay_factor once more: the
    first step after `decay_at` fractions of the run's tokens are trained."""
    points = tuple(opt_cfg.decay_at)
    if any(not 0 < p < 1 for p in points) or list(points) != sorted(set(points)):
        raise UserError(
            f"optimizer.decay_at={points}: give increasing fractions of the run's tokens "
            "strictly inside (0, 1), e.g. (0.6, 0.9)"
        )
    return tuple(plan.step_reaching(p * plan.tokens) for p in points)


def learning_rate(opt_cfg: OptimizerSettings, run: int | Plan) -> optax.Schedule:
    """Linear warmup over `warmup_steps` updates, then the step decay at `decay_at` fractions
    of the tokens ("step", the paper's) or a cosine by tokens to `final_fraction` ("cosine").

    `run`: a Plan, or a step count at a fixed batch size."""
    plan = run if isinstance(run, Plan) else Plan.fixed(run)
    peak, warmup, kind = opt_cfg.learning_rate, opt_cfg.warmup_steps, opt_cfg.schedule
    if not 0 <= warmup < plan.steps:
        raise UserError(
            f"optimizer.warmup_steps={warmup} must lie in [0, train.steps={plan.steps}): lower it"
        )
    if kind not in SCHEDULES:
        raise UserError(f"optimizer.schedule={kind!r}: choose one of {SCHEDULES}")
    bounds = decay_steps(opt_cfg, plan)
    warm_tokens = float(plan.tokens_after(warmup))
    span = max(float(plan.tokens) - warm_tokens, 1.0)

    def lr(count):
        count = jnp.asarray(count)
        warming = peak * count.astype(jnp.float32) / max(warmup, 1)
        if kind == "step":
            drops = sum((count >= b).astype(jnp.float32) for b in bounds)
            after = peak * opt_cfg.decay_factor**drops
        else:
            progress = jnp.clip((plan.tokens_after_jnp(count) - warm_tokens) / span, 0.0, 1.0)
            cosine = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
            after = peak * (opt_cfg.final_fraction + (1.0 - opt_cfg.final_fraction) * cosine)
        return jnp.where(count < warmup, warming, after).astype(jnp.float32)

    return lr


# The plan printer ------------------------------------------------------------------------------


def tokens_str(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.4g}{unit}"
    return f"{n:g}"


def describe(config: RunConfig) -> str:
    """The run's plan as text: length, batch stages, rate changes, losses, routing, rope."""
    plan = make_plan(config)
    oc, m, tc = config.optimizer, config.model, config.train

    def at(step: int) -> str:
        return f"step {step:>9,}  after {tokens_str(plan.tokens_after(step - 1)):>8} tokens"

    lines = [
        f"run      {plan.steps:,} steps, {tokens_str(plan.tokens)} tokens "
        f"({plan.tokens:,}) at sequence length {plan.seq_len}",
        "batch    " + ("fixed" if len(plan.batches.sizes) == 1 else "ramped, one compile each"),
    ]
    for size, start in zip(plan.batches.sizes, plan.batches.starts, strict=True):
        lines.append(f"         {size:>6} sequences from {at(start)}")
    peak, warmup = oc.learning_rate, oc.warmup_steps
    lines.append(
        f"lr       0 -> {peak:g} linearly over {warmup} steps, {peak:g} from {at(warmup + 1)}"
        if warmup
        else f"lr       {peak:.4g} from step 1 (no warmup)"
    )
    if oc.schedule == "step":
        factor = 1.0
        for point, count in zip(oc.decay_at, decay_steps(oc, plan), strict=True):
            factor *= oc.decay_factor
            lines.append(
                f"         x{oc.decay_factor:g} = {oc.learning_rate * factor:.4g} from "
                f"{at(count + 1)} ({point:.0%} of the tokens)"
            )
    else:
        lines.append(f"         cosine by tokens to {oc.learning_rate * oc.final_fraction:.4g}")
    dropping = "none (dropless)"
    if m.capacity_factor is not None:
        dropping = (
            f"capacity factor {m.capacity_factor}, {m.no_drop_fraction:.0%} of the sequences "
            "never dropped"
        )
    rope = "plain"
    if m.rope_scaling is not None:
        y = m.rope_scaling
        rope = f"YaRN factor {y.factor:g} from {y.original_max_position_embeddings}"
    lines += [
        f"adamw    b1 {oc.b1}, b2 {oc.b2}, weight decay {oc.weight_decay} (matrices and "
        f"embeddings; no norm scale), clip {oc.clip_norm}",
        f"balance  alpha1 {m.aux_loss_alpha1} (expert), alpha2 {m.aux_loss_alpha2} (device), "
        f"alpha3 {m.aux_loss_alpha3} (communication)",
        f"routing  {m.n_routed_experts} experts top-{m.num_experts_per_tok}, {m.topk_method}, "
        f"{m.topk_group} of {m.n_group} groups; mesh expert axis {config.mesh.expert}",
        f"dropping {dropping}",
        f"rope     {rope}, theta {m.rope_theta:g}; init std {m.initializer_range}",
    ]
    if tc.continues:
        lines.append(
            f"start    continues {tc.continues} from train.init_from="
            f"{tc.init_from or '(unset: required)'}"
        )
    return "\n".join(lines)


@report_errors("python -m deepseek_jax.train.schedule")
def main(argv: list[str] | None = None) -> None:
    """`python -m deepseek_jax.train.schedule --config NAME_OR_FILE [--config.<field>=...]`."""
    from deepseek_jax import configs  # noqa: PLC0415  (the command line's edge)
    from deepseek_jax.cli import args as cli_args  # noqa: PLC0415
    from deepseek_jax.cli.parser import Parser  # noqa: PLC0415

    parser = Parser("python -m deepseek_jax.train.schedule", __doc__)
    cli_args.add_config_flags(parser)
    args, config = cli_args.parse(parser, argv, with_config=True)
    if args.print_config:
        cli_args.print_config(config)
        return
    print(describe(configs.from_config_dict(config)))


if __name__ == "__main__":
    main()
