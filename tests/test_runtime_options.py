"""Runtime options that must not change results: the layer loop, the persistent compile cache."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.params import stack_layers, unstack_layers


def test_unrolled_layers_match_scan(family_checkpoints):
    for family in ("llama", "falcon"):
        scan = jaxinfer.load(family_checkpoints(family).path, layer_loop="scan")
        assert not isinstance(scan.params["layers"], list)
        unrolled = jaxinfer.load(family_checkpoints(family).path, layer_loop="unrolled")
        assert isinstance(unrolled.params["layers"], list)
        assert len(unrolled.params["layers"]) == scan.config.n_layers
        tokens = np.array([[1, 7, 3, 9, 4], [5, 2, 8, 8, 1]])
        np.testing.assert_allclose(unrolled.logits(tokens), scan.logits(tokens), atol=2e-5)
        prompts = [[1, 7, 3], [5, 2, 8, 8, 1, 4]]
        a = scan.generate(prompts, max_new_tokens=6, stop_tokens=[])
        b = unrolled.generate(prompts, max_new_tokens=6, stop_tokens=[])
        assert a.tokens == b.tokens


def test_stack_unstack_roundtrip(family_checkpoints):
    params = stack_layers(family_checkpoints("gemma").model.params)
    assert isinstance(unstack_layers(params)["layers"], list)
    again = stack_layers(unstack_layers(params))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_per_layer_cache_writes_match_stacked(dtype):
    """The unrolled decode loop's per-layer cache buffers hold exactly what the stacked cache
    holds after the same token writes, scales included."""
    import jax.numpy as jnp

    from jaxinfer.cache import KVCache
    from jaxinfer.config import ModelConfig

    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2,
                      head_dim=4, d_ff=32, max_context=8)
    stacked = KVCache.init(cfg, batch=2, max_len=8, dtype=jnp.dtype(dtype))
    stacked = stacked.replace(lengths=jnp.array([3, 5], jnp.int32))
    split = stacked.unstack_layers()
    assert split.per_layer and len(split.k) == 3 and split.k[0].shape == (2, 2, 8, 4)
    assert (split.batch, split.max_len) == (stacked.batch, stacked.max_len)
    rng = np.random.default_rng(0)
    for layer in (2, 0):
        k, v = (jnp.asarray(rng.standard_normal((2, 2, 4)), jnp.float32) for _ in range(2))
        stacked, split = stacked.write_token(layer, k, v), split.write_token(layer, k, v)
    joined = split.stack_layers()
    assert not joined.per_layer
    for got, want in zip(jax.tree.leaves(joined), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(joined.k[2], np.float32)).sum() > 0  # the writes landed


def test_auto_layer_loop_unrolls_on_cpu(family_checkpoints):
    assert jaxinfer.load(family_checkpoints("llama").path).layer_loop == "unrolled"


def test_unknown_layer_loop_is_an_error(family_checkpoints):
    with pytest.raises(ValueError, match="layer_loop"):
        jaxinfer.load(family_checkpoints("llama").path, layer_loop="sideways")


_PROGRAM = """
import sys
import jax
import jaxinfer
m = jaxinfer.load(sys.argv[1])
print(jax.config.jax_compilation_cache_dir)
print(m.generate([[1, 2, 3]], max_new_tokens=4, stop_tokens=[]).tokens)
"""


def _run(path, env_value):
    env = dict(os.environ, JAXINFER_COMPILATION_CACHE=env_value, XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", _PROGRAM, path], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_persistent_compilation_cache(tmp_path, family_checkpoints):
    path = family_checkpoints("mistral").path
    cache_dir = str(tmp_path / "xla")
    first = _run(path, cache_dir)
    assert first[0] == cache_dir
    assert os.listdir(cache_dir), "compiled programs were not written to the cache"
    second = _run(path, cache_dir)
    assert second == first  # same tokens when programs come from the cache
    off = _run(path, "0")
    assert off[0] in ("None", "")
    assert off[1] == first[1]
