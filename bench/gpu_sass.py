"""The decode kernel compiled for a GPU without one: registers, spills and SASS instructions.

    python bench/gpu_sass.py [--arch 90] [--dtype float16] [--json out.json]

The Triton decode kernel (`ops/triton_decode.py`) is bound by instructions, not bytes, so what it
executes per cached token says more about its speed than anything else a machine without a GPU
can measure. For each of gpu_decode.py's recipes at issue 5's two shapes this builds the exact
launch a decode step makes (`triton_decode.launch`), compiles it for the architecture with the
ptxas that ships in Triton's wheel, and reads the cubin back:
- `registers` per thread and `spill_bytes` (the stack frame: registers that did not fit);
- `loop_instructions`: SASS instructions of the main loop's body (the largest loop), which runs
  once per `block` tokens of each split; `per_token` is the two divided;
- `inner_loops`: the sizes of the other loops (the key outliers' run of a block's densest token,
  the value outliers' pass after the main loop, the sinks and window).
Instruction counts are a proxy for time: they ignore latency, occupancy and memory; time comes
from bench/gpu_decode.py on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import gearfx
from gearfx.compress.layout import allocate, cache_layout
from gearfx.ops import triton_decode
from gearfx.recipes import Recipe

import gpu_decode  # this script's folder is on the path

SHAPES = gpu_decode.SHAPES[:2]  # issue 5's (the third is a shorter context of the first)
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8",
           torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64"}
TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def decode_launch(recipe: str | Recipe, batch: int, q_heads: int, kv_heads: int, head_dim: int, context: int,
                  dtype: torch.dtype = torch.float16, sms: int = 132) -> triton_decode.Launch:
    """The decode kernel's launch of one decode step at this shape, on a GPU of `sms` SMs, with
    the tensors on the CPU: compiling it needs only their dtypes and the constants."""
    recipe = gearfx.load_recipe(recipe) if isinstance(recipe, str) else recipe
    state = allocate(cache_layout(recipe, batch, kv_heads, head_dim, context, dtype))
    q = torch.zeros(batch, q_heads, 1, head_dim, dtype=dtype)
    fresh = torch.zeros(batch, kv_heads, 1, head_dim, dtype=dtype)
    mask = torch.ones(1, 1, 1, context, dtype=torch.bool)
    tokens = context  # the cache's slots, all compressed but the window
    splits = min(triton.cdiv(tokens, 256), max(triton.cdiv(tokens, 1024), triton.cdiv(4 * sms, batch * kv_heads)))
    return triton_decode.launch(q, state, recipe, context, torch.tensor([context - 1]), mask, head_dim ** -0.5,
                                fresh, fresh, splits)


def compile_decode(recipe: str | Recipe, batch: int, q_heads: int, kv_heads: int, head_dim: int, context: int,
                   dtype: torch.dtype = torch.float16, arch: int = 90, sms: int = 132, off: dict | None = None):
    """`decode_launch`'s kernel compiled for sm_<arch>: (the launch, the compiled kernel). off:
    constants that switch a correction off (`gpu_decode.TERMS`)."""
    run = decode_launch(recipe, batch, q_heads, kv_heads, head_dim, context, dtype, sms)
    run = run._replace(constants={**run.constants, **(off or {})})
    fn = triton_decode._decode_kernel
    signature, attrs = {}, {}
    for i, (name, arg) in enumerate(zip(fn.arg_names, run.args)):
        if isinstance(arg, torch.Tensor):  # launches specialise 16-byte aligned pointers so
            signature[name], attrs[(i,)] = POINTER[arg.dtype], [["tt.divisibility", 16]]
        elif isinstance(arg, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if arg % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in run.constants})
    kernel = triton.compile(ASTSource(fn, signature, run.constants, attrs), target=GPUTarget("cuda", arch, 32))
    return run, kernel


def _tool(name: str, *args: str) -> str:
    return subprocess.run([os.path.join(TOOLS, name), *args], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> list[int]:
    """Instruction counts of the loop bodies of an nvdisasm listing (a backward branch each),
    largest first."""
    labels, body = {}, []
    for line in sass.splitlines():
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(body)
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            body.append(line)
    sizes = []
    for i, line in enumerate(body):
        branch = re.search(r"BRA\S*\s+(?:`\()?(\.L_x_\d+)", line)
        if branch and labels.get(branch.group(1), i + 1) <= i:
            sizes.append(i + 1 - labels[branch.group(1)])
    return sorted(sizes, reverse=True)


def measure(recipe_name: str, shape: tuple, dtype: torch.dtype, arch: int, off: dict | None = None) -> dict:
    label, *dims = shape
    run, kernel = compile_decode(recipe_name, *dims, dtype=dtype, arch=arch, off=off)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _tool("cuobjdump", "--dump-resource-usage", f.name)
        sass = _tool("nvdisasm", "-c", f.name)
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    sizes = loops(sass)
    block = run.constants["BLOCK_T"]
    return dict(shape=label, recipe=recipe_name, dtype=str(dtype).removeprefix("torch."), arch=f"sm_{arch}",
                block=block, registers=registers, spill_bytes=stack, loop_instructions=sizes[0],
                per_token=sizes[0] / block, inner_loops=sizes[1:])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--recipes", default=",".join(gpu_decode.RECIPES))
    parser.add_argument("--terms", action="store_true",
                        help="also count, at the first shape, each gear recipe's loop without each of its "
                             "corrections (gpu_decode.py times the same on a GPU)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows, terms = [], []
    for shape in SHAPES:
        for recipe in args.recipes.split(","):
            row = measure(recipe, shape, getattr(torch, args.dtype), args.arch)
            rows.append(row)
            print(f"{row['shape']:<24} {recipe:<14} block {row['block']:>2}  {row['registers']:>3} registers  "
                  f"spills {row['spill_bytes']:>4} B  loop {row['loop_instructions']:>5} instructions "
                  f"({row['per_token']:.1f} a token)  other loops {row['inner_loops']}", flush=True)
    dtype = getattr(torch, args.dtype)
    for recipe in args.recipes.split(",") if args.terms else []:
        if not recipe.startswith("gear"):
            continue
        full = next(r for r in rows if r["recipe"] == recipe and r["shape"] == SHAPES[0][0])
        row = dict(shape=full["shape"], recipe=recipe, per_token=full["per_token"])
        for term, off in gpu_decode.terms(decode_launch(recipe, *SHAPES[0][1:], dtype=dtype).constants).items():
            row[f"without {term}"] = measure(recipe, SHAPES[0], dtype, args.arch, off)["per_token"]
        terms.append(row)
        print("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows, terms=terms), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
