"""The Triton decode kernel against the reference op, under the Triton interpreter on the CPU.

Every case runs a prefill through the reference, then decode steps through both the reference and
the kernel on copies of the same state: outputs must agree, and the states must stay identical
(window writes and chunk closes are the reference's own code).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gearfx.compress.layout import allocate, cache_layout
from gearfx.ops import reference, triton_decode  # interpreted: tests/conftest.py sets TRITON_INTERPRET
from gearfx.recipes import parse_recipe


def _recipe(window=16, h2o=None, **parts):
    body = {"name": "case", "window": window, "loops": 2}
    body.update(parts)
    if h2o:
        body["h2o"] = h2o
    return parse_recipe(body)


CASES = {
    "kivi-2bit": _recipe(key={"bits": 2, "axis": "channel", "group": 16},
                         value={"bits": 2, "axis": "token", "group": 16}),
    "gear-4bit": _recipe(key={"bits": 4, "axis": "channel", "group": 16, "rank": 1, "outliers": 0.02},
                         value={"bits": 4, "axis": "token", "group": 32, "rank": 2, "outliers": 0.02}),
    "k3-v8": _recipe(key={"bits": 3, "axis": "channel", "group": 8, "outliers": 0.01},
                     value={"bits": 8, "axis": "token", "group": 16}),
    "k5-v6": _recipe(key={"bits": 5, "axis": "token", "group": 16, "rank": 1},
                     value={"bits": 6, "axis": "channel", "group": 16, "outliers": 0.03}),
    "k4g128-v4g8": _recipe(window=128, key={"bits": 4, "axis": "channel", "group": 128, "rank": 1},
                           value={"bits": 4, "axis": "token", "group": 8, "outliers": 0.01}),
    "rotate-sinks": _recipe(rotate=True, sinks=4, key={"bits": 4, "axis": "channel", "group": 16, "outliers": 0.02},
                            value={"bits": 2, "axis": "token", "group": 16}),
    "k7-v16": _recipe(window=32, key={"bits": 7, "axis": "channel", "group": 32}, value={"bits": 16}),
    # keys per token in two scale groups a code position; values per channel, read by whole bytes
    "k4t-v4c": _recipe(key={"bits": 4, "axis": "token", "group": 8, "outliers": 0.02},
                       value={"bits": 4, "axis": "channel", "group": 16, "outliers": 0.02}),
    # values in groups of 4 channels: four blocks a row, gathered code by code
    "k2-v4g4": _recipe(key={"bits": 2, "axis": "channel", "group": 16}, value={"bits": 4, "axis": "token", "group": 4}),
    # 64-token chunks over 16-token blocks: a chunk's outliers span blocks (and splits)
    "w64": _recipe(window=64, key={"bits": 4, "axis": "channel", "group": 16, "outliers": 0.02},
                   value={"bits": 2, "axis": "token", "group": 32, "outliers": 0.02}),
    "h2o": _recipe(h2o={"heavy": 12, "recent": 8, "sinks": 2}),
    "h2o-4bit": _recipe(window=4, h2o={"heavy": 12, "recent": 8, "sinks": 2, "decay": 0.95},
                        key={"bits": 4, "axis": "token", "group": 16, "outliers": 0.06},
                        value={"bits": 2, "axis": "token", "group": 32, "outliers": 0.03}),
}


def _mask(kind, b, length, start, capacity, pad):
    """The model's mask for `length` queries from position `start`: row i of batch 1 is left-padded."""
    pos = torch.arange(start, start + length)[:, None]
    keys = torch.arange(capacity)[None, :]
    allowed = (keys <= pos)[None].expand(b, length, capacity).clone()
    allowed[1:, :, :pad] = False
    allowed = allowed[:, None]
    if kind == "none":
        return None
    if kind == "bool":
        return allowed
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _keys(shape, generator):
    """Keys with a few large channels, as real keys have."""
    x = torch.randn(shape, generator=generator)
    x[..., 3] = x[..., 3] * 8 + 5
    return x


RUNS = [(case, groups, "bool") for case in CASES for groups in (1, 3) if case not in ("k4g128-v4g8", "w64") or groups == 1] + [
    (case, 2, kind) for case in ("gear-4bit", "h2o-4bit") for kind in ("none", "additive")]


@pytest.mark.parametrize("case, groups, mask_kind", RUNS)
def test_decode_matches_reference(case, groups, mask_kind):
    _compare(CASES[case], groups, mask_kind, torch.float32, 1e-4)


@pytest.mark.parametrize("case, tol", [("gear-4bit", 2e-3), ("h2o-4bit", 2e-3), ("k4t-v4c", 8e-3)])
def test_decode_matches_reference_in_half_precision(case, tol):
    """fp16 dots: the codes become fp16 pairs by bit arithmetic (`triton_decode._code_tile`) and
    are dequantized by fp16 FMAs (keys per channel, values per token) or scale the fp32 dot (keys
    per token, values per channel), so outputs agree to fp16 rounding. k4t-v4c's keys come in
    8-channel scale groups, too narrow for a GPU dot: they are gathered and dequantized to fp16
    before the dot, a rounding of the codes' reconstruction where the reference rounds the
    reconstruction plus outliers (token 7's keys are 30x the others: 1.5e-3 of the output)."""
    _compare(CASES[case], 2, "bool", torch.float16, tol)


def _compare(recipe, groups, mask_kind, dtype, tol):
    g = torch.Generator().manual_seed(0)
    b, h, d, steps, w = 2, 2, 32, 6, recipe.window if recipe.h2o is None else 64
    capacity, prompt = 5 * w, 3 * w - 5  # the last steps close chunk 2 and read it
    pad = 0 if mask_kind == "none" else 3
    state = allocate(cache_layout(recipe, b, h, d, capacity, dtype))
    q = torch.randn(b, h * groups, prompt, d, generator=g)
    k, v = _keys((b, h, prompt, d), g), torch.randn(b, h, prompt, d, generator=g)
    k[:, :, 7] *= 30  # a token with huge keys in every channel: its chunk's outliers crowd onto it
    reference.attend(q.to(dtype), k.to(dtype), v.to(dtype), torch.arange(prompt),
                     _mask(mask_kind, b, prompt, 0, capacity, pad), 0.2, recipe, capacity, state)
    mine = {n: t.clone() for n, t in state.items()}
    for position in range(prompt, prompt + steps):
        q = torch.randn(b, h * groups, 1, d, generator=g).to(dtype)
        k, v = _keys((b, h, 1, d), g).to(dtype), torch.randn(b, h, 1, d, generator=g).to(dtype)
        cache_position = torch.tensor([position])
        mask = _mask(mask_kind, b, 1, position, capacity, pad)
        want = reference.attend(q, k, v, cache_position, mask, 0.2, recipe, capacity, state)
        got = triton_decode.decode(q, k, v, cache_position, mask, 0.2, recipe, capacity, mine)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=f"{recipe.name} at {position}")
        for name, t in state.items():
            if name == "h2o.scores":  # attention mass, summed in a different order
                torch.testing.assert_close(mine[name], t, rtol=1e-4, atol=1e-5)
            else:
                assert torch.equal(mine[name], t), f"{recipe.name}: {name} differs at {position}"


@pytest.mark.parametrize("case", ["gear-4bit", "h2o-4bit", "w64"])
def test_splits_agree(case):
    """Flash-decoding splits over the compressed store merge to the single-split result, and
    H2O's attention probabilities (eviction scores) sum to one."""
    recipe = CASES[case]
    g = torch.Generator().manual_seed(1)
    b, h, groups, d, capacity, prompt = 1, 2, 2, 32, 128, 100
    state = allocate(cache_layout(recipe, b, h, d, capacity, torch.float32))
    q = torch.randn(b, h * groups, prompt, d, generator=g)
    k, v = _keys((b, h, prompt, d), g), torch.randn(b, h, prompt, d, generator=g)
    reference.attend(q, k, v, torch.arange(prompt), None, 0.2, recipe, capacity, state)
    q, k, v = torch.randn(b, h * groups, 1, d, generator=g), _keys((b, h, 1, d), g), torch.randn(b, h, 1, d, generator=g)
    cache_position = torch.tensor([prompt])
    if recipe.h2o is not None:
        reference.store_h2o_token(k, v, cache_position, None, recipe, capacity, state)
    else:
        state["window.key"][:, :, prompt % recipe.window] = k[:, :, 0].half()
        state["window.value"][:, :, prompt % recipe.window] = v[:, :, 0].half()
    one, p1 = triton_decode.attention(q, state, recipe, capacity, cache_position, None, 0.2, k, v, splits=1)
    three, p3 = triton_decode.attention(q, state, recipe, capacity, cache_position, None, 0.2, k, v, splits=3)
    torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-5)
    if p1 is not None:
        torch.testing.assert_close(p3, p1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p1.sum(-1), torch.ones(b, h * groups, 1))


def test_kernel_compiles_for_hopper_without_spills(tmp_path):
    """The kernel as a decode step launches it at issue 5's shapes, compiled for sm_90 with the
    ptxas in Triton's wheel (bench/gpu_sass.py, outside the interpreter): registers suffice (the
    one-hot outlier products it had spilled 976 bytes a thread for gear-2bit), and the main loops
    stay near the instructions a cached token they were cut to (gear-4bit 61 -> 23 -> 17.3,
    gear-2bit 130 -> 35 -> 26.3)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "sass.json"
    subprocess.run([sys.executable, "bench/gpu_sass.py", "--recipes", "gear-4bit,gear-2bit,gear-4bit-h2o",
                    "--json", str(out)], env=env, check=True, cwd=Path(__file__).parents[1], capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6
    assert all(r["spill_bytes"] == 0 for r in rows), rows
    assert all(r["per_token"] < 21 for r in rows if r["recipe"] == "gear-4bit"), rows
    assert all(r["per_token"] < 30 for r in rows if r["recipe"] == "gear-2bit"), rows


def test_every_case_compiles_for_the_gpu():
    """The interpreter runs shapes the GPU compiler rejects (a dot must reduce over 16 or more):
    every case above at its head_dim 32, and every shipped recipe the kernel serves at SmolLM2's
    shape (head_dim 64) and at Llama's (128), compiled for sm_90 outside the interpreter. At 128,
    a program's shared memory must leave room for a second on an SM (228 KB on Hopper): pipelined
    loads beyond that halve the programs that hide a decode step's memory latency."""
    code = (
        "import gearfx, gpu_sass\n"
        "from gearfx.ops import triton_decode\n"
        "from tests.test_triton import CASES\n"
        "for r in CASES.values():\n"
        "    gpu_sass.compile_decode(r, 2, 4, 2, 32, 5 * (r.window if r.h2o is None else 64))\n"
        "for name in gearfx.list_recipes():\n"
        "    r = gearfx.load_recipe(name)\n"
        "    if (r.compresses or r.h2o) and triton_decode.supports(r, 64):\n"
        "        gpu_sass.compile_decode(r, 1, 9, 3, 64, 1024)\n"
        "        _, kernel = gpu_sass.compile_decode(r, 8, 32, 8, 128, 8192)\n"
        "        assert kernel.metadata.shared <= 228 * 1024 // 2 - 1024, (name, kernel.metadata.shared)\n"
    )
    root = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "bench"), str(root)])
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
