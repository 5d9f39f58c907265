"""Runtime options that must not change results: the persistent compile cache; the one layer
representation."""

import os
import subprocess
import sys

import jaxinfer


def test_layers_and_cache_are_one_buffer_per_layer(family_checkpoints):
    """One representation: every layer's weights and KV cache are their own arrays (a list /
    tuple per layer), read and written in place; nothing is stacked."""
    model = family_checkpoints("llama").model
    assert isinstance(model.params["layers"], list)
    assert len(model.params["layers"]) == model.config.n_layers
    assert model.params["layers"][0]["wq"].ndim == 3  # [D, N, H]: no layers axis
    cache = jaxinfer.KVCache.init(model.config, 2, 8)
    assert isinstance(cache.k, tuple) and len(cache.k) == model.config.n_layers


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
