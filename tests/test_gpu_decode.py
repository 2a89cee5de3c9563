"""bench/gpu_decode.py on the CPU, under the Triton interpreter at small shapes, so that the
script a GPU session runs cannot rot: its check against the reference, its rows, and the launches
that say where the kernel's time goes (timing faked: each timed call runs once)."""

import pytest
import torch

from bench import gpu_decode
from gearfx.ops import triton_decode

TINY = ("tiny", 1, 4, 2, 64, 256)  # label, batch, query heads, KV heads, head_dim, context


def test_check_crosses_a_chunk_close_within_fp16_rounding():
    # the steps from position 58 close the chunk at 63
    error = gpu_decode.check("gear-4bit", torch.float16, "cpu", b=1, h=2, groups=2, d=64, capacity=128, prompt=58,
                             steps=8)
    assert 0 < error < 2e-3


def test_row_counts_every_state_byte(monkeypatch):
    monkeypatch.setattr(gpu_decode, "_time", lambda fn: (fn(), 2.0)[1])
    row = gpu_decode.bench(*TINY, "gear-2bit", 1e9, "cpu")
    assert row["speedup"] == 1.0 and row["bytes_ratio"] == row["state_bytes"] / (2 * 1 * 2 * 256 * 64 * 2)
    assert row["byte_floor_ms"] == row["state_bytes"] / 1e9 * 1e3


@pytest.mark.parametrize("recipe, terms", [
    ("gear-4bit", ["key outliers", "value outliers", "key factors"]),
    ("gear-4bit-h2o", ["key outliers", "value outliers"]),
])
def test_each_switched_off_term_changes_the_kernel_output(monkeypatch, recipe, terms):
    launches, outputs = [], []
    launch = triton_decode.launch
    monkeypatch.setattr(triton_decode, "launch", lambda *a, **k: launches.append(launch(*a, **k)) or launches[-1])

    def run_once(fn):
        fn()
        outputs.append(launches[-1].acc.clone())
        return 1.0

    monkeypatch.setattr(gpu_decode, "_time", run_once)
    row = gpu_decode.ablation(*TINY, recipe, "cpu")
    assert list(row) == ["shape", "recipe", "kernel_only_ms"] + [f"without {t} ms" for t in terms]
    full, *without = outputs
    assert all(not torch.equal(full, other) for other in without)
