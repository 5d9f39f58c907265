"""jaxinfer's own (orbax) checkpoints, tokenizers and the command line."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import tokenizers

import jaxinfer
from jaxinfer import CheckpointError
from jaxinfer.cli import main

WORDS = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(93)]


def _write_tokenizer(path):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, family_checkpoints):
    path = str(tmp_path_factory.mktemp("tok") / "llama")
    shutil.copytree(family_checkpoints("llama").path, path)
    _write_tokenizer(path)
    return path


def test_orbax_roundtrip_is_exact(tmp_path, family_checkpoints):
    for family in ("gemma", "falcon"):
        model = family_checkpoints(family).model
        out = str(tmp_path / family)
        model.save(out)
        restored = jaxinfer.load(out)
        assert restored.config == model.config
        for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(restored.params)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        tokens = np.array([[1, 5, 9, 13]])
        np.testing.assert_array_equal(restored.logits(tokens), model.logits(tokens))


def test_save_refuses_to_overwrite(tmp_path, family_checkpoints):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        family_checkpoints("llama").model.save(str(tmp_path / "full"))
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_corrupt_jaxinfer_checkpoint(tmp_path, family_checkpoints):
    out = str(tmp_path / "ck")
    family_checkpoints("mistral").model.save(out)
    meta = json.load(open(os.path.join(out, "jaxinfer.json")))
    meta["config"]["n_layers"] = 3
    json.dump(meta, open(os.path.join(out, "jaxinfer.json"), "w"))
    with pytest.raises(CheckpointError, match="does not match its config|cannot restore"):
        jaxinfer.load(out)
    meta["config"]["bogus"] = 1
    json.dump(meta, open(os.path.join(out, "jaxinfer.json"), "w"))
    with pytest.raises(CheckpointError, match="bogus"):
        jaxinfer.load(out)
    shutil.rmtree(os.path.join(out, "params"))
    meta["config"].pop("bogus")
    json.dump(meta, open(os.path.join(out, "jaxinfer.json"), "w"))
    with pytest.raises(CheckpointError, match="cannot restore parameters"):
        jaxinfer.load(out)


def test_text_prompts_and_decoded_text(with_tokenizer):
    model = jaxinfer.load(with_tokenizer)
    res = model.generate(["w5 w6 w7", "w9"], max_new_tokens=4, stop_tokens=[])
    ids = model.tokenizer.encode("w5 w6 w7")
    assert ids == [8, 9, 10]
    assert res.tokens[0] == model.generate([ids], max_new_tokens=4, stop_tokens=[]).tokens[0]
    assert res.text[0] == model.tokenizer.decode(res.tokens[0])
    assert all(isinstance(t, str) for t in res.text)


def test_cli_generate_tokens_matches_api(capsys, family_checkpoints):
    ckpt = family_checkpoints("llama")
    assert main(["generate", "--model", ckpt.path, "--tokens", "5,17,33", "--max-new-tokens",
                 "6", "--stop-tokens", "", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip())
    api = ckpt.model.generate([[5, 17, 33]], max_new_tokens=6, stop_tokens=[])
    assert out["tokens"] == api.tokens[0] and out["finish_reason"] == "length"


def test_cli_generate_text(capsys, with_tokenizer):
    assert main(["generate", "--model", with_tokenizer, "--prompt", "w5 w6", "--max-new-tokens",
                 "3", "--temperature", "0.8", "--top-k", "5", "--seed", "1"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("w5 w6") and len(line.split()) >= 3


def test_cli_reports_errors(capsys, family_checkpoints):
    assert main(["generate", "--model", family_checkpoints("llama").path, "--tokens", "5,999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "jaxinfer", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "generate" in out.stdout
