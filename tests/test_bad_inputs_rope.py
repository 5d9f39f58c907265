"""RoPE configurations: each one transformers accepts is resolved as transformers resolves it
(asked from transformers itself: its config loading and the Llama rotary embedding's `inv_freq`
and `attention_scaling`), or rejected naming the field."""

import json
import math

import numpy as np
import pytest
import transformers
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

import hf_fixtures
import jaxinfer
from jaxinfer import ConfigError, rope
from jaxinfer.hf_config import config_from_hf

BASE = dict(model_type="llama", vocab_size=96, hidden_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
            max_position_embeddings=256)
HEAD_DIM = 16
LONG = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]

# name -> the RoPE part of a config.json
ACCEPTED = {
    "no_rope_fields": {},
    "v5_default_theta": {"rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}},
    "v4_theta_only": {"rope_theta": 20000.0},
    "v4_linear": {"rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "v5_default_beside_v4_linear": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0},
        "rope_scaling": {"type": "linear", "factor": 2.0}},
    "v5_theta_wins_over_top_level": {
        "rope_theta": 7000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}},
    "empty_v4_beside_v5_linear": {
        "rope_scaling": {}, "rope_parameters": {"rope_type": "linear", "factor": 3.0,
                                                "rope_theta": 100.0}},
    "v5_linear": {"rope_parameters": {"rope_type": "linear", "factor": 4.0}},
    "v5_dynamic": {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
    "v4_dynamic": {"rope_scaling": {"type": "dynamic", "factor": 4.0}},
    "v5_yarn": {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 64}},
    "v5_yarn_mscale": {"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "mscale": 0.707,
                                           "mscale_all_dim": 1.0,
                                           "original_max_position_embeddings": 32}},
    "v5_yarn_explicit": {"rope_parameters": {
        "rope_type": "yarn", "factor": 4.0, "attention_factor": 1.25, "beta_fast": 16.0,
        "beta_slow": 2.0, "truncate": False, "original_max_position_embeddings": 64,
        "rope_theta": 50000.0}},
    "v5_yarn_no_original": {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
    "v5_longrope": {"rope_parameters": {"rope_type": "longrope", "factor": 4.0,
                                        "short_factor": SHORT, "long_factor": LONG,
                                        "original_max_position_embeddings": 256}},
    "v5_llama3": {"rope_parameters": dict(hf_fixtures.LLAMA3_ROPE, rope_theta=500000.0)},
    "v4_llama3_type_key": {"rope_theta": 500000.0, "rope_scaling": {
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}},
}


def _hf_rotary(tmp_path, raw):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = transformers.AutoConfig.from_pretrained(str(tmp_path))
    emb = LlamaRotaryEmbedding(cfg)
    return emb.inv_freq.numpy(), float(emb.attention_scaling)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_rope_resolved_as_transformers_does(name, tmp_path):
    raw = dict(BASE, **ACCEPTED[name])
    want_freq, want_factor = _hf_rotary(tmp_path, raw)
    cfg = config_from_hf(json.loads(json.dumps(raw)))
    got = rope.inv_freq(cfg)
    assert got.dtype == np.float32 and got.shape == (HEAD_DIM // 2,)
    np.testing.assert_allclose(got, want_freq, rtol=2e-6, atol=0)
    assert math.isclose(rope.attention_factor(cfg), want_factor, rel_tol=1e-6)


def test_issue_case_linear_beside_default_is_not_ignored():
    raw = dict(BASE, **ACCEPTED["v5_default_beside_v4_linear"])
    cfg = config_from_hf(raw)
    assert cfg.rope_scaling.rope_type == "linear" and cfg.rope_scaling.factor == 2.0
    assert cfg.rope_theta == 10000.0  # transformers drops rope_parameters' theta with it


REJECTED = [
    ({"rope_parameters": {"rope_type": "ntk-aware", "factor": 2.0}},
     "rope_parameters.rope_type='ntk-aware'"),
    ({"rope_scaling": {"type": "su", "factor": 2.0}}, "rope_scaling.rope_type='su'"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "partial_rotary_factor=0.5"),
    ({"partial_rotary_factor": 0.25}, "partial_rotary_factor=0.25"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "foo": 1}},
     "rope_parameters.foo"),
    ({"rope_parameters": [1, 2]}, "rope_parameters must be an object"),
    ({"rope_parameters": {"rope_type": "linear"}}, "lacks 'factor'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "2"}},
     "rope_parameters.factor must be a finite number"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 0.0}}, "rope_scaling.factor"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                          "original_max_position_embeddings": 64}},
     "rope_type='longrope' changes the RoPE frequencies"),
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": SHORT[:3],
                          "long_factor": LONG}}, "short_factor has 3 entries"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "truncate": "yes"}},
     "truncate must be true or false"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                          "high_freq_factor": 1.0}}, "high_freq_factor"),
]


@pytest.mark.parametrize("fields, words", REJECTED)
def test_rope_config_rejected_naming_the_field(fields, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
        config_from_hf(dict(BASE, **fields))


PARITY = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"rope_type": "longrope", "factor": 4.0, "short_factor": SHORT,
                 "long_factor": LONG, "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("kind", sorted(PARITY))
def test_rope_types_logit_parity_with_transformers(kind, tmp_path):
    """Through the model: a random HF Llama with this RoPE config, loaded by jaxinfer."""
    hf_model = hf_fixtures.build_hf_model(
        "llama", rope_scaling=None, rope_parameters=dict(PARITY[kind], rope_theta=10000.0),
        num_hidden_layers=1, max_position_embeddings=256)
    path = hf_fixtures.save_hf_checkpoint(hf_model, str(tmp_path / kind))
    model = jaxinfer.load(path)
    assert model.config.rope_scaling.rope_type == kind
    tokens = np.random.RandomState(3).randint(0, hf_fixtures.VOCAB, (2, 40))
    np.testing.assert_allclose(model.logits(tokens), hf_fixtures.hf_logits(hf_model, tokens),
                               atol=1e-4, rtol=0)
