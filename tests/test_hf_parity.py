"""jaxinfer vs Hugging Face transformers on random checkpoints of every supported family."""

import numpy as np
import pytest

import hf_fixtures
import jaxinfer

FAMILIES = hf_fixtures.FAMILIES
LOGIT_ATOL = 1e-4  # float32; measured max error is ~5e-6 (see the closing note of issue 2)
PROMPTS = [[5, 17, 33, 8, 61], [12, 40, 3, 77, 19, 25, 90, 6, 14], [70, 2, 45]]
NEW_TOKENS = 8


@pytest.mark.parametrize("family", FAMILIES)
def test_config_translation(family, family_checkpoints):
    ckpt = family_checkpoints(family)
    cfg = ckpt.model.config
    assert cfg.name == family
    assert cfg.attention_kind == hf_fixtures.ATTENTION_KIND[family]
    # torch's parameters() yields a tied embedding once, as param_count() counts it.
    assert cfg.param_count() == sum(p.numel() for p in ckpt.hf_model.parameters())
    assert cfg.eos_token_ids == (2,)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(family, family_checkpoints):
    ckpt = family_checkpoints(family)
    tokens = np.random.RandomState(1).randint(0, hf_fixtures.VOCAB, (2, 13))
    ref = hf_fixtures.hf_logits(ckpt.hf_model, tokens)
    got = ckpt.model.logits(tokens)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_greedy_batch_matches_reference(family, family_checkpoints):
    ckpt = family_checkpoints(family)
    res = ckpt.model.generate(PROMPTS, max_new_tokens=NEW_TOKENS, stop_tokens=[])
    for prompt, tokens, reason in zip(PROMPTS, res.tokens, res.finish_reasons):
        assert tokens == hf_fixtures.hf_greedy(ckpt.hf_model, prompt, NEW_TOKENS)
        assert reason == "length"


@pytest.mark.parametrize("family", ["llama", "falcon"])
def test_repetition_penalty_matches_reference(family, family_checkpoints):
    ckpt = family_checkpoints(family)
    prompt = PROMPTS[0]
    res = ckpt.model.generate([prompt], max_new_tokens=NEW_TOKENS, stop_tokens=[],
                              repetition_penalty=1.8)
    assert res.tokens[0] == hf_fixtures.hf_greedy(ckpt.hf_model, prompt, NEW_TOKENS,
                                                  repetition_penalty=1.8)


def test_sharded_checkpoint_index(tmp_path, family_checkpoints):
    ckpt = family_checkpoints("llama")
    sharded = hf_fixtures.save_hf_checkpoint(ckpt.hf_model, str(tmp_path / "sharded"),
                                             max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    tokens = np.array([[3, 9, 27, 81, 50]])
    np.testing.assert_array_equal(jaxinfer.load(sharded).logits(tokens), ckpt.model.logits(tokens))


def test_bfloat16_load_close_to_float32(family_checkpoints):
    ckpt = family_checkpoints("mistral")
    m16 = jaxinfer.load(ckpt.path, dtype="bfloat16")
    assert m16.dtype.name == "bfloat16"
    tokens = np.array([[3, 9, 27, 81, 50, 11]])
    ref, got = ckpt.model.logits(tokens), m16.logits(tokens)
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_reads_equal_full_conversion(family, family_checkpoints):
    """Sharded loading: every leaf's random slice, read alone, equals the full conversion's slice."""
    import jax

    from jaxinfer import hf_weights

    ckpt = family_checkpoints(family)
    reader = hf_weights.SafetensorsReader(ckpt.path)
    full = hf_weights.convert_hf_weights(reader, ckpt.model.config, "float32")
    rng = np.random.default_rng(0)
    leaves = jax.tree_util.tree_leaves_with_path(full)
    for key_path, value in leaves:
        keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in key_path)
        # a layer's leaf is read as row `layer` of the stacked [layers, ...] source
        path, lead = (("layers",) + keys[2:], (slice(keys[1], keys[1] + 1),)) \
            if keys[0] == "layers" else (keys, ())
        for _ in range(3):
            bounds = [sorted(rng.choice(n + 1, size=2, replace=False)) for n in value.shape]
            index = tuple(slice(int(a), int(b)) for a, b in bounds)
            got = hf_weights.read_hf_shard(reader, ckpt.model.config, "float32", path,
                                           lead + index)
            got = got[0] if lead else got
            np.testing.assert_array_equal(got, value[index], err_msg=f"{path} {index}")
    assert len(leaves) >= 8
