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
