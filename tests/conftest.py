"""Test setup: 8 simulated CPU devices for mesh tests, set before JAX is imported anywhere."""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXINFER_COMPILATION_CACHE", "0")
# the suite never reads or writes the user's calibration files (~/.cache/jaxinfer); tests that
# need one write it under their own tmp_path
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxinfer-tests-cache-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402


@dataclasses.dataclass
class FamilyCheckpoint:
    family: str
    path: str
    hf_model: object
    model: object  # jaxinfer.Model loaded from `path`


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory):
    """One random HF checkpoint per supported family, saved and loaded by jaxinfer (lazily)."""
    import hf_fixtures
    import jaxinfer

    cache: dict[str, FamilyCheckpoint] = {}

    def get(family: str) -> FamilyCheckpoint:
        if family not in cache:
            hf_model = hf_fixtures.build_hf_model(family)
            path = str(tmp_path_factory.mktemp(f"hf_{family}"))
            hf_fixtures.save_hf_checkpoint(hf_model, path)
            cache[family] = FamilyCheckpoint(family, path, hf_model, jaxinfer.load(path))
        return cache[family]

    return get
