"""`scripts/device_check.py --smoke` end to end on CPU: one JSON with every kernel case (XLA
reference timings here; the Pallas kernels and JAX's ops run only on an accelerator) and the
end-to-end decode figures. (Its speed is not asserted: timed tests fail on a loaded machine; the
report records its wall time.)"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "device_check.py")


@pytest.mark.slow
def test_device_check_smoke_writes_the_report(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    subprocess.run([sys.executable, SCRIPT, str(out), "--smoke"], check=True, env=env,
                   capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    assert report["platform"] == "cpu" and report["smoke"] is True
    cases = {r["case"].split(" ")[0] for r in report["kernels"]}
    assert cases == {"decode", "flash", "ragged", "matmul"}
    timed = [r for r in report["kernels"] if "error" not in r]
    assert timed and all(r["us"] > 0 and r["gb_s"] > 0 for r in timed)
    names = {r["name"] for r in report["kernels"]}
    assert {"xla reference", "bf16 XLA dot"} <= names
    assert any(n.startswith("int4") for n in names) and any(n.startswith("int8") for n in names)
    rows = report["end_to_end"]
    assert [r["batch"] for r in rows] == report["sizes"]["batches"]
    for r in rows:
        assert r["jax_tok_s"] > 0 and 0 < r["roofline"] and r["hf_tok_s"] is None
        assert r["engine"]["tok_s"] > 0 and r["engine"]["device_calls"] < r["engine"]["steps"]
    assert report["wall_s"] > 0
