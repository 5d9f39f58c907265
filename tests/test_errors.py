"""Bad input gives a clear exception naming the problem."""

import json
import os
import shutil

import numpy as np
import pytest

import hf_fixtures
import jaxinfer
from jaxinfer import CheckpointError, ConfigError, ModelConfig
from jaxinfer.hf_config import config_from_hf


def _hf_dict(family, **overrides):
    return hf_fixtures.hf_config(family, **overrides).to_dict()


@pytest.mark.parametrize("family, overrides, field", [
    ("falcon", dict(alibi=True), "alibi"),
    ("falcon", dict(new_decoder_architecture=True), "new_decoder_architecture"),
    ("falcon", dict(multi_query=False), "multi_query"),
    ("falcon", dict(parallel_attn=False), "parallel_attn"),
    ("falcon", dict(bias=True), "bias"),
    ("llama", dict(attention_bias=True), "attention_bias"),
    ("llama", dict(mlp_bias=True), "mlp_bias"),
    ("llama", dict(hidden_act="relu"), "hidden_act"),
])
def test_unsupported_config_field_is_named(family, overrides, field):
    with pytest.raises(ConfigError, match=field):
        config_from_hf(_hf_dict(family, **overrides))


def test_unsupported_rope_type_is_named():
    raw = _hf_dict("llama")
    raw["rope_parameters"] = {"rope_type": "ntk-by-parts", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ConfigError, match="rope_parameters.rope_type='ntk-by-parts'"):
        config_from_hf(raw)
    legacy = _hf_dict("llama")
    legacy.pop("rope_parameters")
    legacy.update(rope_theta=10000.0, rope_scaling={"type": "su", "factor": 2.0})
    with pytest.raises(ConfigError, match="rope_scaling.rope_type='su'"):
        config_from_hf(legacy)


def test_unknown_config_field_and_family_are_rejected():
    raw = _hf_dict("qwen2")
    raw["attn_logit_softcapping"] = 50.0
    with pytest.raises(ConfigError, match="attn_logit_softcapping"):
        config_from_hf(raw)
    raw = _hf_dict("llama")
    raw["model_type"] = "gpt2"
    with pytest.raises(ConfigError, match="model_type 'gpt2'"):
        config_from_hf(raw)


def test_sliding_window_shorter_than_the_context_is_rejected():
    with pytest.raises(ConfigError, match="sliding_window=64: it is shorter than the context"):
        config_from_hf(_hf_dict("mistral", sliding_window=64))
    cfg = config_from_hf(_hf_dict("qwen2", use_sliding_window=False, sliding_window=64))
    assert cfg.max_context == 256
    assert config_from_hf(_hf_dict("mistral", sliding_window=256)).max_context == 256


def test_invalid_model_config():
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=3, n_kv_heads=2, head_dim=4,
                    d_ff=8, max_context=8)
    with pytest.raises(ConfigError, match="activation"):
        ModelConfig(vocab_size=10, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4,
                    d_ff=8, max_context=8, activation="relu")


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                      head_dim=8, d_ff=32, max_context=24)
    return jaxinfer.Model.random(cfg)


def test_prompt_errors(tiny):
    with pytest.raises(ValueError, match="exceeds the model's context of 24"):
        tiny.generate([list(range(20))], max_new_tokens=8)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="token id 32 outside the vocabulary"):
        tiny.generate([[1, 32]], max_new_tokens=4)
    with pytest.raises(ValueError, match="no prompts"):
        tiny.generate([])
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="need a tokenizer"):
        tiny.generate("hello")
    with pytest.raises(ValueError, match="stop token 99"):
        tiny.generate([[1]], max_new_tokens=4, stop_tokens=[99])


def test_logits_errors(tiny):
    with pytest.raises(ValueError, match="token ids must be in"):
        tiny.logits(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="sequence length 25"):
        tiny.logits(np.zeros((1, 25), int))
    with pytest.raises(ValueError, match="integer array"):
        tiny.logits(np.zeros((1, 3), np.float32))


def test_bad_dtype_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        jaxinfer.load(str(tmp_path), dtype="int8")


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_and_corrupt_weight_files(tmp_path, family_checkpoints):
    src = family_checkpoints("llama").path
    with pytest.raises(CheckpointError, match="does not exist"):
        jaxinfer.load(str(tmp_path / "nowhere"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="neither a jaxinfer checkpoint"):
        jaxinfer.load(str(empty))

    no_weights = _copy_checkpoint(src, tmp_path / "no_weights")
    os.remove(os.path.join(no_weights, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no \\*.safetensors weight files"):
        jaxinfer.load(no_weights)

    corrupt = _copy_checkpoint(src, tmp_path / "corrupt")
    weights = os.path.join(corrupt, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.write(b"\xff" * 64)  # clobber the header
    with pytest.raises(CheckpointError, match="corrupt weight file .*model.safetensors"):
        jaxinfer.load(corrupt)

    truncated = _copy_checkpoint(src, tmp_path / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        jaxinfer.load(truncated)


def test_missing_tensor_and_shard_are_named(tmp_path, family_checkpoints):
    ckpt = family_checkpoints("qwen2")
    sharded = hf_fixtures.save_hf_checkpoint(ckpt.hf_model, str(tmp_path / "sharded"),
                                             max_shard_size="100KB")
    index_path = os.path.join(sharded, "model.safetensors.index.json")
    with open(index_path) as fh:
        index = json.load(fh)
    name = "model.layers.1.self_attn.k_proj.bias"
    shard = index["weight_map"].pop(name)
    with open(index_path, "w") as fh:
        json.dump(index, fh)
    with pytest.raises(CheckpointError, match=f"weight '{name}' is missing"):
        jaxinfer.load(sharded)
    index["weight_map"][name] = shard
    with open(index_path, "w") as fh:
        json.dump(index, fh)
    os.remove(os.path.join(sharded, shard))
    with pytest.raises(CheckpointError, match=f"{shard} listed in the index is missing"):
        jaxinfer.load(sharded)


def test_config_and_weights_disagree(tmp_path, family_checkpoints):
    path = _copy_checkpoint(family_checkpoints("mistral").path, tmp_path / "bad_shape")
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as fh:
        raw = json.load(fh)
    raw["intermediate_size"] = 128
    with open(cfg_path, "w") as fh:
        json.dump(raw, fh)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.mlp.(gate|up|down)_proj.weight' .* "
                       r"has shape \((160, 64|64, 160)\), but the config declares "
                       r"\((128, 64|64, 128)\)"):
        jaxinfer.load(path)
