"""notebooks/*.ipynb run top to bottom on a tiny config, and are committed without outputs.

Each notebook has one cell tagged "parameters" (the papermill convention); the test inserts a
cell after it that overrides those values with small ones, so the notebooks themselves carry
no test logic. The kernel is this interpreter's (a "python3" kernelspec written to a temp
JUPYTER_PATH), so a fresh `pip install -e ".[dev]"` venv runs it without registering anything.
"""

import json
import os
import re
import subprocess
import sys
import types

import nbformat
import pytest
from hf_models import build_hf, save_chat_tokenizer
from nbclient import NotebookClient

from deepseek_jax import colab
from deepseek_jax.errors import UserError

NOTEBOOKS = os.path.join(os.path.dirname(__file__), "..", "notebooks")
CACHE = os.environ.get(
    "DEEPSEEK_JAX_TEST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache")
)


def notebook_names() -> list[str]:
    return sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A "python3" kernelspec for this interpreter, first on JUPYTER_PATH; and the test
    compilation cache for the kernel's jax."""
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.path.abspath(CACHE))
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    work = tmp_path / "work"
    work.mkdir()
    return work


def execute(name: str, overrides: dict, cwd, timeout: int) -> nbformat.NotebookNode:
    """Runs notebooks/`name` with `overrides` applied after its parameters cell."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: tag exactly one cell 'parameters' (found {len(tagged)})"
    source = "\n".join(f"{key} = {value!r}" for key, value in overrides.items())
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
    for key in overrides:
        assert f"{key} =" in nb.cells[tagged[0]].source, f"{name} has no parameter {key}"
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def text_of(nb) -> str:
    """Everything the executed cells printed."""
    out = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            out.append(
                output.get("text", "") or "".join(output.get("data", {}).get("text/plain", ""))
            )
    return "".join(out)


@pytest.mark.parametrize("name", notebook_names())
def test_committed_without_outputs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, (
                f"{name} has outputs: clear them (Jupyter: Edit > Clear Outputs of All Cells, or "
                "pip install nbconvert; jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)"
            )


def test_sample_random_tiny_model(kernel_env):
    nb = execute("sample.ipynb", {"MAX_NEW_TOKENS": 8}, kernel_env, timeout=120)
    text = text_of(nb)
    assert "a random tiny model" in text and "latent KV cache" in text
    # The byte tokenizer carries DeepSeek-V2-Chat's template, so the chat cell runs too.
    assert "User: " in text and "Assistant:" in text


def test_sample_hf_chat_checkpoint(kernel_env, tmp_path):
    """An HF directory with a chat template: loads it, streams, chats."""
    checkpoint = tmp_path / "chat"
    checkpoint.mkdir()
    vocab = save_chat_tokenizer(checkpoint)
    build_hf(checkpoint, vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=128)
    overrides = {"CHECKPOINT": str(checkpoint), "MAX_NEW_TOKENS": 8, "CHAT_MESSAGE": "Hi"}
    nb = execute("sample.ipynb", overrides, kernel_env, timeout=120)
    text = text_of(nb)
    assert f"loaded {checkpoint}" in text and "HFTokenizer" in text
    assert "User: Hi\n\nAssistant:" in text


def test_port_checkpoint(kernel_env):
    nb = execute("port_checkpoint.ipynb", {"SEQ_LEN": 8}, kernel_env, timeout=150)
    text = text_of(nb)
    assert "max |round-tripped - original| = 0.00e+00" in text
    assert "orbax params identical to the HF import: True" in text


def test_train(kernel_env):
    overrides = {
        "STEPS": 12,
        "BATCH_SIZE": 4,
        "SEQ_LEN": 64,
        "LAYERS": 2,
        "HOLDOUT_FRACTION": 0.0002,
        "EVAL_EVERY": 6,
        "LOG_EVERY": 2,
        "COMPILATION_CACHE": os.path.abspath(CACHE),
    }
    nb = execute("train.ipynb", overrides, kernel_env, timeout=240)
    images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == 3  # loss curves, the expert-load heatmap, drop rate and fan-out
    assert os.path.isdir(kernel_env / "runs" / "notebook" / "checkpoints")


def install_cell(name: str) -> str:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    cells = [c.source for c in nb.cells if c.cell_type == "code" and "REPO_URL =" in c.source]
    assert len(cells) == 1, f"{name}: one install cell sets REPO_URL"
    return cells[0]


@pytest.mark.parametrize("name", notebook_names())
def test_install_cell_refuses_the_placeholder_then_installs_for_the_runtime(name, monkeypatch):
    """The cell as Colab runs it (a google.colab module present, pip recorded, not run)."""
    calls = []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setattr(subprocess, "check_call", calls.append)
    source = install_cell(name)
    assert f'REPO_URL = "{colab.REPO_URL}"' in source  # one URL, the one colab.py holds
    with pytest.raises(ValueError, match="Set REPO_URL"):
        exec(source, {})
    assert not calls  # refused before anything installed

    url = "https://github.com/someone/deepseek-jax"
    exec(source.replace(colab.REPO_URL, url), {})
    assert calls[0][1:] == ["-m", "pip", "install", "-q", f"deepseek-jax @ git+{url}"]
    assert calls[1][1:5] == ["-m", "deepseek_jax.colab", "--repo", url]
    assert any(a.startswith("--kernel_versions=") for a in calls[1])  # to compare for a restart


def test_colab_links_point_where_the_notebooks_install_from():
    owner = colab.REPO_URL.split("/")[-2]
    readme = open(os.path.join(NOTEBOOKS, "..", "README.md")).read()
    texts = [readme] + [open(os.path.join(NOTEBOOKS, n)).read() for n in notebook_names()]
    links = [
        link
        for t in texts
        for link in re.findall(r"colab\.research\.google\.com/github/[^)\s\"]+", t)
    ]
    assert len(links) >= 2 * len(notebook_names())  # README's table and each notebook's badge
    for link in links:
        assert link.startswith(
            f"colab.research.google.com/github/{owner}/deepseek-jax/blob/main/notebooks/"
        )


def test_install_plan_for_each_runtime():
    url = "https://github.com/someone/deepseek-jax"
    assert colab.install_plan("tpu", url) == ["install", "-q", f"deepseek-jax[tpu] @ git+{url}"]
    assert colab.install_plan("gpu", url)[2] == f"deepseek-jax[cuda12] @ git+{url}"
    assert colab.install_plan("cpu", url, ("transformers>=5",))[2:] == [
        f"deepseek-jax @ git+{url}",
        "transformers>=5",
    ]
    with pytest.raises(UserError, match="REPO_URL="):
        colab.install_plan("cpu")  # the placeholder
    with pytest.raises(UserError, match="runtime='metal'"):
        colab.install_plan("metal", url)

    def machine(env=(), files=(), programs=()):
        return colab.runtime_hint(dict(env), files.__contains__, lambda p: p in programs or None)

    assert machine(env={"TPU_ACCELERATOR_TYPE": "v5litepod-8"}) == "tpu"
    assert machine(files=("/dev/vfio/0",)) == "tpu"  # v5e and later TPU VMs
    assert machine(files=("/dev/accel0",)) == "tpu"  # v2-v4
    assert machine(env={"COLAB_TPU_ADDR": "10.0.0.2:8470"}) == "tpu"
    assert machine(programs=("nvidia-smi",)) == "gpu"
    assert machine() == "cpu"


def test_verdict_says_what_jax_sees_and_when_to_restart():
    assert colab.verdict("gpu", "gpu", {}, {"jax": "0.10.2"}) == "JAX sees the GPU: ready."
    wrong = colab.verdict("tpu", "cpu", {}, {})
    assert "JAX sees 'cpu' but this runtime looked like a TPU one" in wrong
    restart = colab.verdict(
        "tpu", "tpu", {"jax": "0.4.33", "numpy": "2.0.2"}, {"jax": "0.10.2", "numpy": "2.0.2"}
    )
    assert "RESTART THE RUNTIME NOW" in restart and "jax 0.4.33 -> 0.10.2" in restart
    assert "numpy" not in restart
    assert colab.parse_versions("jax=0.4.33,numpy=2.0.2") == {"jax": "0.4.33", "numpy": "2.0.2"}
