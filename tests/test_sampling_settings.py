"""Sampling settings are refused by name when they would sample garbage (NaN or infinite
temperature) or be cut silently (fractional counts): one line each (issue 20, point 4)."""

import math

import jax
import pytest

import deepseek_jax as dj
from deepseek_jax.errors import UserError
from deepseek_jax.generate.sampling import check_settings

BAD = [
    (dict(temperature=math.nan), "temperature=nan"),
    (dict(temperature=math.inf), "temperature=inf"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=math.nan), "top_p=nan"),
    (dict(top_p=math.inf), "top_p=inf"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    (dict(max_new_tokens=0), "max_new_tokens=0"),
]


@pytest.mark.parametrize(("bad", "named"), BAD, ids=[named for _, named in BAD])
def test_bad_sampling_settings_are_refused_by_name(bad, named):
    settings = dict(temperature=1.0, top_k=None, top_p=None, max_new_tokens=4) | bad
    with pytest.raises(UserError) as refused:
        check_settings(**settings)
    assert str(refused.value).startswith(f"{named}: must")
    assert "\n" not in str(refused.value)


def test_generate_checks_before_any_work():
    cfg = dj.preset("tiny").replace(num_hidden_layers=1)
    params = jax.eval_shape(lambda: dj.init_params(cfg, jax.random.key(0)))  # never read
    with pytest.raises(UserError, match=r"^max_new_tokens=2\.5: must be a positive integer$"):
        dj.generate(cfg, params, [[1, 2]], max_new_tokens=2.5)
    with pytest.raises(UserError, match=r"^temperature=nan: must be a finite number"):
        dj.generate(cfg, params, [[1, 2]], max_new_tokens=2, temperature=math.nan)
    check_settings(temperature=0.0, top_k=5, top_p=1.0, max_new_tokens=3)  # good ones pass
