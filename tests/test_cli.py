"""The commands as a user meets them: each mistake below, made on the command line of an
installed package (run as `python -m` from a folder outside the repository), gives exactly one
line on stderr naming the value and the fix, and exit status 2; `--debug` gives the traceback.
Also: one flag style across the commands, configs by name or by file, `--print_config`, and
the console scripts of pyproject.toml equal to `python -m` of their modules.
"""

import concurrent.futures
import importlib
import os
import re
import subprocess
import sys
import tomllib

import pytest
from hf_models import build_hf

from deepseek_jax import configs
from deepseek_jax.cli import args as cli_args
from deepseek_jax.cli import train as cli_train
from deepseek_jax.cli.fields import FIELDS
from deepseek_jax.config import ModelConfig
from deepseek_jax.errors import DEBUG_ENV, UserError
from deepseek_jax.train.settings import GRPOSettings, RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = "deepseek_jax.cli.train"
SAMPLE = "deepseek_jax.cli.sample"
CONVERT = "deepseek_jax.checkpoint.convert"
PLAN = "deepseek_jax.parallel.plan"
PREPARE = "deepseek_jax.cli.prepare"
SIZES = "deepseek_jax.sizes"
PLOT = "deepseek_jax.train.plot"


def command(module: str, *argv: str, cwd, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    # TQDM_DISABLE: a loading bar is progress, not an error line; the count is of the latter.
    environ.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", TQDM_DISABLE="1", **env)
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


# (module, argv, what the one line must say); "{tmp}" is a fresh empty folder, "{hf}" holds
# tiny HF checkpoints: "bytes" (context 48) and "narrow" (a vocabulary of 96 < 256 bytes).
MISTAKES = [
    (TRAIN, ["--config.train.stepz=5"], "config.train has no field 'stepz'; did you mean train.steps?"),
    (TRAIN, ["--config", "nosuch"], "--config 'nosuch': not a config of the package"),
    (TRAIN, ["--config", "{tmp}/none.py"], "not a config of the package"),
    (TRAIN, ["--config", "tiny", "--config.train.steps=abc"], "--config.train.steps='abc': not of type int"),
    (TRAIN, ["--config", "tiny", "--config.model.n_group=3"], "--config.model: n_routed_experts=16 is not divisible by n_group=3"),
    (TRAIN, ["--config.mode=distill"], "--config.mode='distill': choose one of"),
    (TRAIN, ["--config.data.source=nosuch", "--config.train.run_dir={tmp}/run"], "data.source='nosuch': choose one of"),
    (TRAIN, ["--config.mesh.expert=3", "--config.train.run_dir={tmp}/run"], "config.mesh {'data': 0, 'fsdp': 1, 'expert': 3"),
    (TRAIN, ["--config", "tiny", "--config.train.steps=4"], "optimizer.warmup_steps=100 must lie in [0, train.steps=4)"),
    (TRAIN, ["--num_processes=2", "--process_id=2"], "--process_id=2: must lie in 0 .."),
    (TRAIN, ["--num-processes=2"], "unrecognized arguments: --num-processes=2"),
    (TRAIN, ["--config.train.steps"], "--config.train.steps needs a value"),
    (SAMPLE, ["--checkpoint", "{tmp}/missing"], "does not exist"),
    (SAMPLE, ["--checkpoint", "{tmp}", "--max-new-tokens", "3"], "unrecognized arguments: --max-new-tokens"),
    (SAMPLE, [], "the following arguments are required: --checkpoint"),
    (SAMPLE, ["--checkpoint", "{hf}/bytes", "--prompt", "x" * 45], "passes the context of 48"),
    (SAMPLE, ["--checkpoint", "{hf}/narrow", "--prompt", "hi"], "has no tokenizer.json and a vocabulary of 96"),
    (CONVERT, ["{tmp}/missing", "{tmp}/out"], "does not exist and is not a hub id"),
    (CONVERT, ["{tmp}", "{tmp}/out", "--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
    (PLAN, ["--dtype", "bf16"], "argument --dtype: invalid choice: 'bf16'"),
    (PLAN, ["--param-dtype", "bfloat16"], "unrecognized arguments: --param-dtype"),
    (PLAN, ["--mesh", "data=two"], "--mesh 'data=two': write axis=size pairs"),
    (PLAN, ["--preset", "tiny", "--mesh", "expert=3"], "--mesh expert=3 does not divide the 16 routed experts"),
    (PREPARE, ["--config", "tiny"], "the following arguments are required: --out"),
    (PREPARE, ["--config.data.source=arrayrecord", "--out", "{tmp}/packed"], "already prepared"),
    (SIZES, ["--hf_config", "{tmp}/missing"], "no config.json"),
    (PLOT, ["{tmp}/missing"], "a train.py run directory?"),
]  # fmt: skip


def run_all(cases, tmp_path) -> list[subprocess.CompletedProcess]:
    """Each case in its own folder; two at a time (most of each is importing jax)."""
    hf = tmp_path / "hf"
    build_hf(hf / "bytes", vocab_size=256, max_position_embeddings=48)
    build_hf(hf / "narrow", vocab_size=96)

    def one(i_case):
        i, (module, argv, _) = i_case
        tmp = tmp_path / f"case{i}"
        tmp.mkdir()
        argv = (a.replace("{tmp}", str(tmp)).replace("{hf}", str(hf)) for a in argv)
        return command(module, *argv, cwd=tmp)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return list(pool.map(one, enumerate(cases)))


def test_each_mistake_is_one_line_exit_2(tmp_path):
    failures = []
    for (module, argv, message), proc in zip(MISTAKES, run_all(MISTAKES, tmp_path), strict=True):
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 2 or len(lines) != 1 or message not in lines[0]:
            failures.append(
                f"{module} {argv}: exit {proc.returncode}, stderr:\n{proc.stderr[-800:]}"
            )
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("how", [{"argv": ["--debug"]}, {"env": {DEBUG_ENV: "1"}}])
def test_debug_shows_the_traceback(tmp_path, how):
    argv = ["--config.train.stepz=5", *how.get("argv", [])]
    proc = command(TRAIN, *argv, cwd=tmp_path, **how.get("env", {}))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "UserError: --config.train.stepz" in proc.stderr


def test_print_config_prints_every_field_and_exits(tmp_path):
    proc = command(
        TRAIN, "--config", "grpo", "--config.grpo.group_size=4", "--print_config", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == len(cli_args.flatten(configs.load("grpo")))
    assert "grpo.group_size = 4" in proc.stdout
    assert re.search(r"^mode = 'grpo' +# which loop runs", proc.stdout, re.M)
    assert not os.listdir(tmp_path)  # nothing ran


@pytest.mark.parametrize("name", configs.names())
def test_every_field_of_a_shipped_config_has_a_description(name):
    missing = [f for f, _ in cli_args.flatten(configs.load(name)) if f not in FIELDS]
    assert not missing, f"describe {missing} in deepseek_jax/cli/fields.py"


def test_config_by_name_equals_by_file_and_overrides_take_the_field_type(tmp_path):
    by_file = cli_args.resolve(os.path.join(configs.FOLDER, "tiny.py"), [])
    assert by_file.to_dict() == cli_args.resolve("tiny", []).to_dict()
    mine = tmp_path / "mine.py"
    mine.write_text(
        "from deepseek_jax.configs import tiny\n\n"
        "def get_config():\n    c = tiny.get_config()\n    c.train.steps = 7\n    return c\n"
    )
    overrides = [
        ("model.capacity_factor", "1.25"),  # None -> a float
        ("model.q_lora_rank", "32"),  # None -> an int
        ("train.async_checkpoint", "false"),
        ("optimizer.learning_rate", "1"),  # an int where a float is
        ("data.path", "data/*.jsonl"),
        ("model.rope_scaling", "None"),
    ]
    config = cli_args.resolve(str(mine), overrides)
    assert config.train.steps == 7 and config.model.capacity_factor == 1.25
    assert config.model.q_lora_rank == 32 and config.train.async_checkpoint is False
    assert config.optimizer.learning_rate == 1.0 and isinstance(
        config.optimizer.learning_rate, float
    )
    assert config.data.path == "data/*.jsonl" and config.model.rope_scaling is None
    with pytest.raises(UserError, match="not of type bool"):
        cli_args.resolve("tiny", [("train.async_checkpoint", "maybe")])
    with pytest.raises(UserError, match="config.model has no field 'hidden'"):
        cli_args.resolve("tiny", [("model.hidden", "8")])


def test_from_config_dict_types_every_section_and_refuses_unknown_keys():
    """The one converter: a shipped config becomes the typed RunConfig field for field, the
    ConfigDict defaults are the typed ones, and a key no settings class has is named."""
    config = configs.load("grpo")
    run = configs.from_config_dict(config)
    assert isinstance(run, RunConfig) and isinstance(run.model, ModelConfig)
    assert isinstance(run.grpo, GRPOSettings) and run.grpo.init_from == "runs/sft"
    assert run.to_dict() == config.to_dict()  # nothing lost or renamed on the way
    assert configs.base_config("v2").to_dict() == RunConfig().to_dict()  # stated once
    assert configs.from_config_dict(configs.load("tiny")).grpo is None
    with config.unlocked():
        config.train.stepz = 5
    with pytest.raises(UserError, match=r"--config.train.stepz: TrainSettings has no such"):
        configs.from_config_dict(config)
    config = configs.load("tiny")
    with config.unlocked():
        config.extra = 1
    with pytest.raises(UserError, match=r"--config.extra: not a section of a run config"):
        configs.from_config_dict(config)


def test_process_flags_imply_distributed():
    parse = cli_train.parser().parse_args
    assert not cli_train.distributed(parse([]))
    assert cli_train.distributed(parse(["--distributed"]))
    assert cli_train.distributed(parse(["--num_processes=2", "--process_id=1"]))
    assert cli_train.distributed(parse(["--coordinator_address=h:1"]))
    with pytest.raises(UserError, match="--num_processes=0"):
        cli_train.distributed(parse(["--num_processes=0"]))


def scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


@pytest.mark.parametrize("script", sorted(scripts()))
def test_console_script_equals_python_m(script, capsys):
    """The script's function is its module's `python -m` main, and --help shows one flag style:
    underscores, no dashed long flags."""
    module_name, function = scripts()[script].split(":")
    module = importlib.import_module(module_name)
    with open(module.__file__) as f:
        assert f'if __name__ == "__main__":\n    {function}()' in f.read()
    assert script in module.__doc__ and f"python -m {module_name}" in module.__doc__
    with pytest.raises(SystemExit) as exit_:
        getattr(module, function)(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--debug" in help_text
    assert not re.findall(r"--[a-z]+-[a-z-]+", help_text), "flags are spelled with underscores"


def test_every_package_folder_ships():
    """setuptools' find includes a folder only with an __init__.py: a pip install (Colab's)
    would silently lack one without it, though an editable install runs."""
    package = os.path.join(ROOT, "deepseek_jax")
    for folder, _, files in os.walk(package):
        if any(f.endswith(".py") for f in files) and "__pycache__" not in folder:
            assert "__init__.py" in files, f"{folder} needs an __init__.py"
