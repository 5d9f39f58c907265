"""Catalogue of bad checkpoints, configs, paths and saves: each gives one clear error naming the
tensor, field or path (or, for the inputs that should work, the right result)."""

import errno
import json
import os
import pathlib
import re
import shutil

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures
import jaxinfer
from jaxinfer import CheckpointError, ConfigError, InvalidArgument, checkpoint, hf_weights
from jaxinfer.hf_config import config_from_hf

WEIGHTS = "model.safetensors"


@pytest.fixture()
def llama_copy(tmp_path, family_checkpoints):
    """A private copy of the random Llama checkpoint, safe to damage."""
    path = tmp_path / "llama"
    shutil.copytree(family_checkpoints("llama").path, path)
    return path


def _edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


def _edit_tensor(path, name, fn):
    tensors = load_file(str(path / WEIGHTS))
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})


def _hf_dict(family, **overrides):
    return hf_fixtures.hf_config(family, **overrides).to_dict()


Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"

BAD_TENSORS = [
    (Q_PROJ, lambda w: w[:, :32].copy(),
     f"weight '{Q_PROJ}' in .*model.safetensors has shape (64, 32), but the config declares "
     "(64, 64)"),
    (UP_PROJ, lambda w: w.T.copy(), f"weight '{UP_PROJ}' in .* has shape (64, 160), but the "
                                    "config declares (160, 64)"),
    (Q_PROJ, lambda w: w.astype(np.int32),
     f"weight '{Q_PROJ}' in .* has dtype I32; weights must be one of"),
    ("model.norm.weight", lambda w: w.astype(np.bool_), "'model.norm.weight' .* has dtype BOOL"),
    (UP_PROJ, lambda w: np.where(np.arange(w.size).reshape(w.shape) == 70, np.nan, w),
     f"weight '{UP_PROJ}' holds 1 non-finite value(s) (first: nan at index (1, 6)"),
    (EMBED, lambda w: np.where(np.arange(w.size).reshape(w.shape) % 97 == 5, -np.inf, w),
     f"weight '{EMBED}' holds 64 non-finite value(s) (first: -inf at index (0, 5)"),
    ("model.layers.0.input_layernorm.weight", lambda w: np.full_like(w, np.nan),
     "'model.layers.0.input_layernorm.weight' holds 64 non-finite"),
]


@pytest.mark.parametrize("name, fn, words", BAD_TENSORS)
def test_bad_tensor_is_named(llama_copy, name, fn, words):
    _edit_tensor(llama_copy, name, fn)
    with pytest.raises(CheckpointError, match=re.escape(words).replace(r"\.\*", ".*")):
        jaxinfer.load(str(llama_copy))


def test_non_finite_weight_is_named_by_sharded_reads(llama_copy):
    _edit_tensor(llama_copy, UP_PROJ, lambda w: np.full_like(w, np.nan))
    cfg = checkpoint.read_config(str(llama_copy))
    reader = hf_weights.SafetensorsReader(str(llama_copy))
    with pytest.raises(CheckpointError, match=f"weight '{UP_PROJ}' holds"):
        hf_weights.read_hf_shard(reader, cfg, "float32", ("layers", "w_up"),
                                 (slice(0, 2), slice(0, 8), slice(0, 4)))


def test_bfloat16_and_float16_weights_load(llama_copy, family_checkpoints):
    tensors = load_file(str(llama_copy / WEIGHTS))
    halves = {k: v.astype(ml_dtypes.bfloat16 if i % 2 else np.float16)
              for i, (k, v) in enumerate(tensors.items())}
    save_file(halves, str(llama_copy / WEIGHTS), metadata={"format": "pt"})
    tokens = np.array([[3, 9, 27, 81]])
    ref = family_checkpoints("llama").model.logits(tokens)
    got = jaxinfer.load(str(llama_copy)).logits(tokens)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


BAD_CONFIG_FIELDS = [
    (dict(hidden_size="64"), "config field hidden_size must be a positive int, got '64'"),
    (dict(num_attention_heads=5, head_dim=None, num_key_value_heads=5),
     "config field num_attention_heads=5 does not divide hidden_size=64"),
    (dict(num_hidden_layers=2.0), "config field num_hidden_layers must be a positive int"),
    (dict(vocab_size=0), "config field vocab_size must be a positive int, got 0"),
    (dict(max_position_embeddings=True), "config field max_position_embeddings"),
    (dict(rms_norm_eps="1e-6"), "config field rms_norm_eps must be a finite number"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(eos_token_id="2"), "config.json eos_token_id must be a token id"),
    (dict(eos_token_id=[2, 1.5]), "config.json eos_token_id must be a token id"),
    (dict(eos_token_id=500), "eos/bos token id 500 is outside the vocabulary [0, 96)"),
    (dict(bos_token_id=-1), "eos/bos token id -1 is outside the vocabulary"),
    (dict(bos_token_id=1.0), "config field bos_token_id must be an int, got 1.0"),
    (dict(num_key_value_heads=3), "n_heads (4) must be a multiple of n_kv_heads (3)"),
]


@pytest.mark.parametrize("changes, words", BAD_CONFIG_FIELDS)
def test_bad_config_field_is_named(changes, words):
    raw = _hf_dict("llama")
    raw.update(changes)
    with pytest.raises(ConfigError, match=re.escape(words)):
        config_from_hf(raw)


@pytest.mark.parametrize("family, changes, words", [
    ("mistral", dict(sliding_window=64), "sliding_window=64: it is shorter than the context"),
    ("mistral", dict(sliding_window="big"), "sliding_window must be a positive int or null"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=128, max_window_layers=1,
                   layer_types=None), "sliding_window=128"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=100,
                   layer_types=["full_attention", "sliding_attention"]), "sliding_window=100"),
    ("qwen2", dict(layer_types=["full_attention", "chunked"]), "layer_types must be a list of"),
    ("qwen2", dict(use_sliding_window="yes"), "use_sliding_window must be true or false"),
])
def test_sliding_window_is_rejected_naming_it(family, changes, words):
    raw = _hf_dict(family)
    raw.update(changes)
    with pytest.raises(ConfigError, match=re.escape(words)):
        config_from_hf(raw)


def test_sliding_window_covering_the_context_or_unused_loads():
    assert config_from_hf(_hf_dict("mistral", sliding_window=256)).max_context == 256
    assert config_from_hf(_hf_dict("mistral", sliding_window=None)).max_context == 256
    # transformers' Qwen2 applies the window from max_window_layers on: here to no layer
    raw = _hf_dict("qwen2")
    raw.update(use_sliding_window=True, sliding_window=64, max_window_layers=2, layer_types=None)
    assert config_from_hf(raw).max_context == 256


@pytest.mark.parametrize("content, words", [
    ("[1, 2, 3]", "config.json must hold a JSON object, got a JSON list"),
    ('"llama"', "config.json must hold a JSON object, got a JSON str"),
    ("{not json", "corrupt JSON in .*config.json"),
    (b"\xff\xfe{}", "corrupt JSON in .*config.json"),
])
def test_config_json_not_an_object(llama_copy, content, words):
    target = llama_copy / "config.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(CheckpointError, match=words):
        jaxinfer.load(str(llama_copy))


def test_generation_config_not_an_object(llama_copy):
    (llama_copy / "generation_config.json").write_text("[2]")
    with pytest.raises(CheckpointError, match="generation_config.json must hold a JSON object"):
        jaxinfer.load(str(llama_copy))


def test_corrupt_index_and_tokenizer(tmp_path, llama_copy, family_checkpoints):
    sharded = hf_fixtures.save_hf_checkpoint(family_checkpoints("llama").hf_model,
                                             str(tmp_path / "sharded"), max_shard_size="100KB")
    index = pathlib.Path(sharded) / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="corrupt safetensors index .* weight_map must map"):
        jaxinfer.load(sharded)
    (llama_copy / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="cannot read tokenizer .*tokenizer.json"):
        jaxinfer.load(str(llama_copy))


@pytest.mark.parametrize("source, words", [
    (None, "source must be a path (str or os.PathLike), got None"),
    (123, "source must be a path (str or os.PathLike), got 123"),
    ("", "source must be a non-empty path"),
    (["a"], "source must be a path"),
])
def test_bad_load_source(source, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        jaxinfer.load(source)


def test_load_path_that_is_a_file(tmp_path):
    target = tmp_path / "weights.bin"
    target.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint directory"):
        jaxinfer.load(str(target))


def test_load_options_checked(family_checkpoints):
    path = family_checkpoints("llama").path
    with pytest.raises(InvalidArgument, match=r"group_size must be an int in \[1, inf\], got 1.5"):
        jaxinfer.load(path, quantize="int4", group_size=1.5)


def test_load_accepts_a_pathlib_path(family_checkpoints):
    ckpt = family_checkpoints("llama")
    tokens = np.array([[5, 6, 7]])
    np.testing.assert_array_equal(jaxinfer.load(pathlib.Path(ckpt.path)).logits(tokens),
                                  ckpt.model.logits(tokens))


@pytest.fixture(scope="module")
def small_model():
    cfg = jaxinfer.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1,
                               head_dim=8, d_ff=32, max_context=24)
    return jaxinfer.Model.random(cfg)


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("path, words", [
    (None, "path must be a path (str or os.PathLike), got None"),
    (3.5, "path must be a path"),
])
def test_bad_save_path(small_model, path, words):
    with pytest.raises(InvalidArgument, match=re.escape(words)):
        small_model.save(path)


def test_save_onto_a_file_and_bad_overwrite_flag(small_model, tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InvalidArgument, match="is an existing file; save needs a directory"):
        small_model.save(str(target))
    with pytest.raises(InvalidArgument, match="overwrite must be True or False, got 'yes'"):
        small_model.save(str(tmp_path / "out"), overwrite="yes")


def test_save_never_overwrites_unless_asked(small_model, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    (out / "keep").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"refusing to overwrite non-empty directory .* "
                                              r"\(pass overwrite=True"):
        small_model.save(str(out))
    assert (out / "keep").read_text() == "keep me"
    small_model.save(str(out), overwrite=True)
    assert not (out / "keep").exists()
    tokens = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(jaxinfer.load(str(out)).logits(tokens),
                                  small_model.logits(tokens))
    assert _siblings(out) == ["ck"]


def test_save_into_an_empty_directory(small_model, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    small_model.save(out)
    assert checkpoint.is_jaxinfer_checkpoint(str(out)) and _siblings(out) == ["empty"]


def _full_disk(directory, *args, **kwargs):
    os.makedirs(os.path.join(directory, "params"))
    with open(os.path.join(directory, "params", "partial"), "wb") as fh:
        fh.write(b"half a tensor")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_leaves_nothing_behind(small_model, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "write_checkpoint", _full_disk)
    out = tmp_path / "ck"
    with pytest.raises(CheckpointError, match="cannot save checkpoint to .*ck: No space left on "
                                              "device; nothing was written there"):
        small_model.save(str(out))
    assert _siblings(out) == []


def test_full_disk_keeps_the_old_checkpoint(small_model, tmp_path, monkeypatch):
    out = tmp_path / "ck"
    small_model.save(str(out))
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(checkpoint, "write_checkpoint", _full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        small_model.save(str(out), overwrite=True)
    monkeypatch.undo()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert _siblings(out) == ["ck"]
    small_model.save(str(out), overwrite=True)  # the retry succeeds: nothing was left blocking
    jaxinfer.load(str(out))


def _damage_orbax(out, mode):
    files = [p for p in (out / "params").rglob("*") if p.is_file()]
    for p in files:
        if mode == "data" and "/d/" in str(p):
            with open(p, "r+b") as fh:
                fh.write(b"\x00garbage" * 8)
        elif mode == "truncate" and "/d/" in str(p):
            os.truncate(p, 10)
        elif mode == "manifest" and p.name == "manifest.ocdbt":
            p.unlink()


@pytest.mark.parametrize("mode", ["data", "truncate", "manifest"])
def test_corrupt_orbax_checkpoint_is_one_clear_error(small_model, tmp_path, capfd, mode):
    out = tmp_path / "ck"
    small_model.save(str(out))
    _damage_orbax(out, mode)
    capfd.readouterr()
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        jaxinfer.load(str(out))
    captured = capfd.readouterr()
    noise = captured.out + captured.err
    assert "Traceback" not in noise and "Event loop is closed" not in noise
    assert len(noise.splitlines()) <= 2, noise


@pytest.mark.parametrize("content, words", [
    ("[]", "jaxinfer.json must hold a JSON object, got a JSON list"),
    ('{"format": "jaxinfer", "version": 99}', "unsupported jaxinfer checkpoint format"),
])
def test_corrupt_jaxinfer_meta(small_model, tmp_path, content, words):
    out = tmp_path / "ck"
    small_model.save(str(out))
    (out / "jaxinfer.json").write_text(content)
    with pytest.raises(CheckpointError, match=words):
        jaxinfer.load(str(out))
