"""README.md's "library in ten lines" runs as written: the block after its marker comment is
taken from the README (so editing the README changes what runs here), and executed in a folder
where "DeepSeek-V2-Lite-Chat" is a tiny random HF checkpoint, on 8 fake CPU devices for its
data=2 x expert=4 mesh."""

import os
import re
import subprocess
import sys

from hf_models import build_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("DEEPSEEK_JAX_TEST_CACHE", os.path.join(ROOT, ".jax_cache"))
MARKER = "<!-- readme-snippet: library"


def library_snippet() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert MARKER in readme, f"README.md lost the marker {MARKER!r} before its ten lines"
    block = re.search(r"```python\n(.*?)```", readme[readme.index(MARKER) :], re.S)
    return block.group(1)


def test_library_snippet_runs_as_written(tmp_path):
    # V2-Lite's routing (greedy, no groups) at test size; 8 routed experts split 4 ways.
    build_hf(tmp_path / "DeepSeek-V2-Lite-Chat", n_routed_experts=8, max_position_embeddings=64)
    checks = (
        "\nassert out.logits.shape == (1, 8, cfg.vocab_size), out.logits.shape"
        "\nassert new.shape == (1, 16), new.shape"
        "\nassert os.path.exists('out_dir/config.json')"
        "\nprint('snippet ran')\n"
    )
    (tmp_path / "snippet.py").write_text(library_snippet() + "\nimport os" + checks)
    env = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_COMPILATION_CACHE_DIR=os.path.abspath(CACHE),  # the suite's cache (conftest.py)
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
    )
    run = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and "snippet ran" in run.stdout, run.stderr[-4000:]
