"""bench/gpu_e2e.py on the CPU, so that the script a GPU session runs cannot rot: its smoke mode,
its batch search with the allocator's statistics faked, and the step down on out-of-memory."""

import json

import pytest
import torch

from bench import gpu_e2e

SMOKE = ["--device", "cpu", "--tiny", "--eager", "--prompt", "96", "--new", "40"]  # decode crosses a chunk close


def test_smoke_mode_checks_then_measures_every_configuration(tmp_path):
    out = tmp_path / "out.json"
    doc = gpu_e2e.main(SMOKE + ["--batch", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    assert [(c["recipe"], c["ok"]) for c in doc["check"]] == [("fp16", True), ("gear-4bit", True), ("kivi-4bit", True)]
    hf, gear, kivi = doc["rows"]
    assert (hf["name"], gear["name"], kivi["name"]) == ("hf-fp16", "gear-4bit", "kivi-4bit")
    assert all(r["batch"] == 2 and r["tokens_per_s"] > 0 for r in doc["rows"])
    assert gear["vs_hf"] == gear["tokens_per_s"] / hf["tokens_per_s"]


class FakeMemory:
    """Every run peaks 1 MiB above its start; 3 MiB are free."""

    def start(self):
        return 0

    def peak_since(self, start):
        return 2**20

    def free(self):
        return 3 * 2**20


def test_batch_search_runs_each_configuration_at_its_estimate(monkeypatch):
    monkeypatch.setattr(gpu_e2e, "memory", lambda device: FakeMemory())
    monkeypatch.setattr(gpu_e2e, "PROBE_BATCH", 2)
    hf, gear = gpu_e2e.main(SMOKE + ["--recipes", "gear-4bit"])["rows"]
    assert hf["probe"]["batch"] == gear["probe"]["batch"] == 2
    assert hf["bytes_per_row_estimate"] == 2**19 and hf["batch"] == 5  # 0.9 * 3 MiB / 0.5 MiB
    per_row = (2**20 + gear["probe"]["state_bytes"]) / 2  # the run's peak and the cache state
    assert gear["bytes_per_row_estimate"] == per_row and gear["batch"] == int(0.9 * 3 * 2**20 / per_row) == 4
    assert gear["state_bytes"] == gear["probe"]["state_bytes"] * 2  # captured again at batch 4
    assert gear["out_of_memory_at"] == [] and gear["vs_hf"] > 0


def test_fit_steps_down_on_out_of_memory():
    def stage(batch):
        if batch > 12:
            raise torch.OutOfMemoryError("fake")
        return {"batch": batch}

    assert gpu_e2e.fit(stage, 16) == (11, {"batch": 11}, [16, 13])
    with pytest.raises(torch.OutOfMemoryError, match=r"\[16, 13, 11\]"):
        gpu_e2e.fit(lambda batch: stage(batch + 100), 16)
