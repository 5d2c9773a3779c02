"""`python -m deepseek_jax.checkpoint.convert`: HF -> orbax -> HF keeps the model exactly;
--dtype, the detected direction, the tokenizer files, and bad input in one line."""

import jax
import ml_dtypes
import numpy as np
import pytest
import transformers
from hf_models import build_hf, hf_logits, save_chat_tokenizer

import deepseek_jax as dj
from deepseek_jax.checkpoint import orbax as orbax_checkpoint
from deepseek_jax.checkpoint.convert import main


def test_hf_to_orbax_to_hf(tmp_path, capsys):
    """Both ways, with the tokenizer files, chat template and generation config carried."""
    hf_model = build_hf(tmp_path / "hf", q_lora_rank=24, num_hidden_layers=2)
    save_chat_tokenizer(tmp_path / "hf")
    main(["--from", "hf", "--to", "orbax", str(tmp_path / "hf"), str(tmp_path / "orbax")])
    main([str(tmp_path / "orbax"), str(tmp_path / "back")])  # direction detected: orbax -> hf
    assert "(orbax) -> " in capsys.readouterr().out
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "hf" / name).read_bytes()

    reloaded = transformers.DeepseekV2ForCausalLM.from_pretrained(
        tmp_path / "back", attn_implementation="eager"
    ).eval()
    tokens = np.random.RandomState(0).randint(0, 96, (2, 16))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))

    cfg, params = orbax_checkpoint.load_params(tmp_path / "orbax")
    assert cfg == dj.load_hf(tmp_path / "hf")[0]


def test_dtype_flag(tmp_path):
    build_hf(tmp_path / "hf", num_hidden_layers=2)
    main([str(tmp_path / "hf"), str(tmp_path / "orbax"), "--dtype", "bfloat16"])
    cfg, params = orbax_checkpoint.load_params(tmp_path / "orbax")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}


def test_hf_to_hf_in_bfloat16(tmp_path, capsys):
    """--to overrides the detected target: an HF re-export in bf16, as load_hf reads it."""
    build_hf(tmp_path / "hf", num_hidden_layers=2)
    main(["--to", "hf", "--dtype", "bfloat16", str(tmp_path / "hf"), str(tmp_path / "bf16")])
    assert "(hf) -> " in capsys.readouterr().out
    cfg, params = dj.load_hf(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16"
    _, params32 = dj.load_hf(tmp_path / "hf")
    for x16, x32 in zip(jax.tree.leaves(params), jax.tree.leaves(params32), strict=True):
        assert x16.dtype == ml_dtypes.bfloat16
        np.testing.assert_allclose(np.asarray(x16, np.float32), x32, rtol=2**-8, atol=0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no/such/dir", "out"], "does not exist and is not a hub id"),
        (["HF", "out", "--mesh", "rows=2"], "--mesh 'rows=2'"),
        (["HF", "out", "--from", "orbax"], "is an hf checkpoint"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, argv, message):
    build_hf(tmp_path / "hf", num_hidden_layers=2)
    argv = [str(tmp_path / "hf") if a == "HF" else a for a in argv]
    capsys.readouterr()  # transformers' progress bars
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert err.startswith("deepseek-jax-convert: ") and message in err and err.count("\n") == 1, err
