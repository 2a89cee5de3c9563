"""Decode throughput end to end: gearfx recipes against HF fp16 `generate`, each at the largest
batch that fits in GPU memory (issue 5's "GPU end to end" row).

    python bench/gpu_e2e.py --json out.json       # one H100/H200, within --budget-s (480 s)
    python bench/gpu_e2e.py --device cpu --tiny --eager --batch 2 --prompt 96 --new 40   # smoke test

Model: Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 KV heads of 64, MLP 8192,
vocabulary 128256, tied embeddings) with random weights, fp16 on CUDA (fp32 on the CPU). Each row
of a batch is `--prompt` random tokens, no padding, followed by `--new` greedy tokens.

Throughput is decode tokens/s = batch * (new - 1) / (time from the first new token to the last):
each token's time is taken after a device sync; the prefill is reported apart. HF runs
`model.generate` with its default cache (DynamicCache) and SDPA attention, greedy; generate
computes the prompt's last logits only, and so does gearfx (the decoder is captured with
last_logits_only). gearfx runs `CompiledModel.generate` on `gearfx.capture` + `gearfx.compile`,
compiled with Inductor (on CUDA its decode attention is the Triton kernel over the codes).

The largest batch: each configuration first runs the full prompt and new tokens at a probe batch
of 16 rows, which gives its memory per row: the peak above what was allocated before the run,
plus gearfx's cache state, or for gearfx the fp cache its capture traces if that is more. The
batch is then 90% of the free memory over that, and runs; on running out of memory it steps down
by 15%. A gearfx batch is fixed when it is captured and each try is a capture and a compile (a
minute or so), hence the estimate rather than a search. HF goes first, then each recipe, probe
and full size, in turn. Before each full-size run its time is estimated from the probe's (scaled
by the batch: an upper bound); a run that would end past `--budget-s` is skipped, and so is a
recipe not yet probed once the budget is spent; the JSON says so.

Correctness first, on the same model and device: a short prompt (40 tokens) and 40 steps fed
HF's greedy tokens (so one rounding tie cannot derail the rest; the steps cross gear-4bit's first
chunk close), with an fp32 copy of the model as the reference.
- fp16 recipe (eager unless measured): its logits must be no further from the fp32 logits than
  twice HF's fp16 logits are. Its greedy tokens then equal HF's but at rounding ties (HF's top-2
  margin within twice the two runs' difference), which random weights in fp16 have plenty of:
  both are counted in the JSON.
- gear-4bit, and every other measured recipe when it is probed, compiled (on CUDA the Triton
  decode kernel): its logits must be no more than 1.5x as far from the fp32 logits as the
  reference op's, run eagerly on the same device. A fixed bound would mean nothing here: on
  random weights attention averages near-random values, so 4-bit codes move the logits by about
  15% (relative norm) once the first chunk is compressed, where the CPU tests' tiny models see
  under 5%. The two runs quantize slightly different inputs (fp16 rounding), so they are
  compared through their distance to fp32, not to each other.
The script stops with CheckFailed otherwise: before any full-size run for fp16 and gear-4bit,
which are checked first.

The JSON (`--json`) is written after every stage, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import time

# Growing caches (HF's DynamicCache reallocates every step) fragment the default allocator's
# segments; a largest-batch measurement should be bounded by memory, not by fragmentation. Read
# at CUDA's first allocation, so it must be set before.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import transformers  # noqa: E402

import gearfx  # noqa: E402

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True)
PROBE_BATCH = 16
HEADROOM = 0.9  # of the free memory, for the batch estimate
STEP_DOWN = 0.85  # batch factor after running out of memory
TRIES = 3  # batches tried per configuration
CHECK_PROMPT, CHECK_STEPS = 40, 40  # the steps cross position 63, where gear-4bit closes its first chunk
CHECKED = ("fp16", "gear-4bit")
HF = "hf-fp16"


class CheckFailed(RuntimeError):
    """gearfx's logits on this device are not what the reference says they should be."""


class CudaMemory:
    """The CUDA caching allocator's statistics, which the batch search reads."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> int:
        """Allocated bytes now; the peak counter starts again from here."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak_since(self, start: int) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - start

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]


def memory(device: torch.device) -> CudaMemory | None:
    """The device's allocator statistics; None where there are none (the CPU)."""
    return CudaMemory(device) if device.type == "cuda" else None


class Steps(transformers.LogitsProcessor):
    """The time of each new token, after a device sync: HF generate calls it after each forward
    (as a logits processor), gearfx's generate after each token (as on_token)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times = [time.perf_counter()]

    def mark(self, *_) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def row(self, batch: int) -> dict:
        new = len(self.times) - 1
        decode_s = self.times[-1] - self.times[1]
        return dict(batch=batch, prefill_s=self.times[1] - self.times[0], decode_s=decode_s,
                    tokens_per_s=batch * (new - 1) / decode_s)


def free_memory() -> None:
    """Return what the collected objects held to the device (a no-op before CUDA is initialised)."""
    gc.collect()
    torch.cuda.empty_cache()


def build(config: dict, device: torch.device, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """A Llama with random weights; no end-of-sequence token, so every row makes every new token."""
    cfg = transformers.LlamaConfig(**config, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def prompts(batch: int, length: int, vocab: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(vocab, (batch, length), generator=g).to(device)


def run_hf(model, ids: torch.Tensor, new: int) -> dict:
    steps = Steps(ids.device)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                       logits_processor=transformers.LogitsProcessorList([steps]))
    return steps.row(ids.shape[0])


def run_gearfx(gm: gearfx.CompiledModel, ids: torch.Tensor, new: int) -> dict:
    steps = Steps(ids.device)
    gm.generate(ids, max_new_tokens=new, on_token=steps.mark)
    return steps.row(ids.shape[0])


def measure(run, mem: CudaMemory | None) -> dict:
    """run() -> row, with the row's peak memory above what was allocated before it (None without
    allocator statistics)."""
    start = mem and mem.start()
    row = run()
    row["peak_bytes"] = mem and mem.peak_since(start)
    return row


def fit(stage, batch: int) -> tuple[int, dict, list[int]]:
    """stage(batch) -> row at `batch`, stepping down by STEP_DOWN while it runs out of memory
    (TRIES batches at most). Returns (the batch that ran, its row, the batches that did not fit)."""
    failed = []
    for _ in range(TRIES):
        try:
            return batch, stage(batch), failed
        except torch.OutOfMemoryError:
            failed.append(batch)
        free_memory()  # out of the except block, so the failed stage's frames are gone
        batch = max(1, int(batch * STEP_DOWN))
    raise torch.OutOfMemoryError(f"out of memory at every batch tried: {failed}")


def teacher_forced(gm: gearfx.CompiledModel, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, steps, V] (fp32) of the prompt's last position and of each of `tokens` [B, steps]
    but the last, fed in turn."""
    out = [gm.prefill(ids)[:, -1]]
    for i in range(tokens.shape[1] - 1):
        out.append(gm.decode(tokens[:, i : i + 1])[:, -1])
    return torch.stack(out, 1).float()


def check_reference(model, batch: int, vocab: int, device: torch.device) -> dict:
    """HF's greedy tokens and logits on a short prompt, and an fp32 copy's logits for the same
    tokens (one forward over prompt + tokens)."""
    ids = prompts(batch, CHECK_PROMPT, vocab, device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=CHECK_STEPS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[:, CHECK_PROMPT:]
        fp32 = copy.deepcopy(model).float()
        exact = fp32(torch.cat([ids, tokens[:, :-1]], 1)).logits[:, CHECK_PROMPT - 1 :].float()
    del fp32
    free_memory()
    return dict(ids=ids, tokens=tokens, hf=torch.stack(out.logits, 1).float(), exact=exact)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_fp16(got: torch.Tensor, ref: dict) -> dict:
    """The fp16 recipe's teacher-forced logits `got` against HF's and the fp32 model's."""
    exact, hf = ref["exact"], ref["hf"]
    hf_err = (hf - exact).abs().max().item()
    err = (got - exact).abs().max().item()
    same = got.argmax(-1) == ref["tokens"]
    top2 = hf.topk(2, dim=-1).values
    # a step whose greedy token can flip between the two runs: HF's top-2 margin is within twice
    # their largest difference there
    tie = (top2[..., 0] - top2[..., 1]) <= 2 * (got - hf).abs().amax(-1)
    # an fp32 device (the smoke test) has no rounding noise to compare with: 1e-4 of the logits' range
    limit = 2 * hf_err + 1e-4 * exact.abs().max().item()
    return dict(recipe="fp16", max_abs_err_vs_fp32=err, hf_max_abs_err_vs_fp32=hf_err, limit=limit, ok=err <= limit,
                steps=same.numel(), tokens_equal_hf=int(same.sum()), ties=int(tie.sum()))


def check_against_eager(recipe: str, got: torch.Tensor, eager: torch.Tensor, ref: dict) -> dict:
    """A recipe's teacher-forced logits through the compiled program, `got`, against the
    reference op's, run eagerly on the same device, `eager` (see the module docstring)."""
    exact = ref["exact"]
    rel, rel_eager = _rel(got, exact), _rel(eager, exact)
    limit = 1.5 * rel_eager + 1e-3
    return dict(recipe=recipe, rel_err_vs_fp32=rel, eager_rel_err_vs_fp32=rel_eager, rel_err_vs_eager=_rel(got, eager),
                limit=limit, ok=rel <= limit, steps=got.shape[0] * got.shape[1],
                tokens_equal_hf=int((got.argmax(-1) == ref["tokens"]).sum()))


class Bench:
    """One run of the script (see `run`); `doc` is its JSON."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.mem = memory(self.device)
        self.recipes = args.recipes.split(",")
        self.config = TINY if args.tiny else LLAMA_1B
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.capacity = args.prompt + args.new
        self.probe_batch = args.batch or PROBE_BATCH
        self.start = time.perf_counter()
        name, triton = str(self.device), None
        if self.device.type == "cuda":
            import triton  # ships with CUDA builds of torch

            name = torch.cuda.get_device_name(self.device)
        self.doc = dict(
            meta=dict(device=name, torch=torch.__version__, transformers=transformers.__version__,
                      triton=triton and triton.__version__, python=platform.python_version(),
                      date=time.strftime("%Y-%m-%d")),
            config=dict(model=self.config, dtype=str(self.dtype), prompt=args.prompt, new=args.new,
                        capacity=self.capacity, probe_batch=self.probe_batch, headroom=HEADROOM, step_down=STEP_DOWN,
                        alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                        hf="model.generate, DynamicCache, sdpa, greedy",
                        gearfx="capture(last_logits_only=True) + compile(recipe)" + (", eager" if args.eager else "")),
            check=[], rows=[])
        self.model = build(self.config, self.device, self.dtype)
        self.log(f"{self.doc['meta']}\n  model: {sum(p.numel() for p in self.model.parameters()) / 1e9:.2f} B "
                 f"parameters, {self.dtype}; prompt {args.prompt} + {args.new} new tokens")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, message: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {message}", flush=True)

    def save(self) -> None:
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.doc, f, indent=1)

    def prompts(self, batch: int) -> torch.Tensor:
        return prompts(batch, self.args.prompt, self.config["vocab_size"], self.device)

    def capture(self, batch: int):
        return gearfx.capture(self.model, max_cache_len=self.capacity, batch_size=batch, last_logits_only=True)

    def run_compiled(self, gm: gearfx.CompiledModel, ids: torch.Tensor, compile_s: float = 0.0) -> dict:
        """A first call at this batch and prompt length (it compiles what is not compiled yet),
        then the measured run. compile_s: the time already spent compiling `gm`."""
        t0 = time.perf_counter()
        gm.generate(ids, max_new_tokens=2)
        compile_s += time.perf_counter() - t0
        row = measure(lambda: run_gearfx(gm, ids, self.args.new), self.mem)
        report = gm.memory_report()
        row.update(compile_s=compile_s, state_bytes=report.total, kv_bytes_ratio=report.ratio)
        return row

    def probe(self, recipe: str, ids: torch.Tensor) -> dict | None:
        """Check `recipe` on the probe decoder (see the module docstring) and, if it is measured,
        run it at the probe batch: returns its row (None if only checked)."""
        measured = recipe in self.recipes
        # fp16 when only checked runs eagerly: gear-4bit's check covers Inductor's code around
        # the attention, and a compile costs a minute
        t0 = time.perf_counter()
        compiled = not self.args.eager and (measured or recipe != "fp16")
        gm = gearfx.compile(self.decoder, recipe, backend_compile=compiled)
        ref = self.reference
        got = teacher_forced(gm, ref["ids"], ref["tokens"])  # compiles the prefill and decode graphs
        compile_s = time.perf_counter() - t0
        if recipe == "fp16":
            self.doc["check"].append(check_fp16(got, ref))
        else:
            eager = gearfx.compile(self.decoder, recipe, backend_compile=False)
            want = teacher_forced(eager, ref["ids"], ref["tokens"])
            self.doc["check"].append(check_against_eager(recipe, got, want, ref))
            del eager
        self.log(f"check: {self.doc['check'][-1]}")
        row = {**self.run_compiled(gm, ids, compile_s), **self.capture_info} if measured else None
        if measured:
            self.log(f"{recipe} probe: {row}")
        del gm
        free_memory()
        return row

    def require_checks(self) -> None:
        if not all(c["ok"] for c in self.doc["check"]):
            self.save()
            raise CheckFailed(f"gearfx's logits on {self.device} are off: {self.doc['check']}")

    def hf_stage(self, batch: int) -> dict:
        return measure(lambda: run_hf(self.model, self.prompts(batch), self.args.new), self.mem)

    def gearfx_stage(self, recipe: str, batch: int) -> dict:
        decoder = self.capture(batch)
        gm = gearfx.compile(decoder, recipe, backend_compile=not self.args.eager)
        del decoder
        return self.run_compiled(gm, self.prompts(batch))

    def full_size(self, name: str, probe: dict) -> dict:
        """The configuration at the largest batch that fits (see the module docstring)."""
        per_row = (probe["peak_bytes"] + probe.get("state_bytes", 0)) / self.probe_batch
        if name != HF:  # the capture holds the traced fp cache of every row for a moment
            per_row = max(per_row, probe["capture_bytes"] / self.probe_batch)
        free_memory()
        batch = max(1, int(HEADROOM * self.mem.free() / per_row))
        scale = batch / self.probe_batch
        expected_s = (probe["prefill_s"] + probe["decode_s"]) * scale
        if name != HF:  # and a capture, a compile and the compiling call's prefill
            expected_s += probe["capture_s"] + probe["compile_s"] + probe["prefill_s"] * scale
        self.log(f"{name}: {per_row / 2**20:.1f} MiB per row -> batch {batch}, at most about {expected_s:.0f} s")
        if self.elapsed() + expected_s > self.args.budget_s:
            return dict(skipped=f"budget: about {expected_s:.0f} s needed at {self.elapsed():.0f} s "
                                f"of {self.args.budget_s:.0f}", batch_estimate=batch)
        stage = self.hf_stage if name == HF else lambda b: self.gearfx_stage(name, b)
        batch, row, failed = fit(stage, batch)
        return {**row, "bytes_per_row_estimate": per_row, "out_of_memory_at": failed, "probe": probe}

    def add_row(self, name: str, probe: dict) -> None:
        row = dict(name=name, **(probe if self.args.batch else self.full_size(name, probe)))
        hf = self.doc["rows"][0] if self.doc["rows"] else {}
        if name != HF and "tokens_per_s" in row and "tokens_per_s" in hf:
            row["vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
        self.doc["rows"].append(row)
        self.save()
        self.log(f"{name}: " + (row["skipped"] if "skipped" in row else
                                f"batch {row['batch']}, {row['tokens_per_s']:.0f} tokens/s" +
                                (f" = {row['vs_hf']:.2f}x HF" if "vs_hf" in row else "")))
        free_memory()

    def run(self) -> dict:
        """HF's probe, the probe capture and the correctness check; then HF at its largest batch,
        and each recipe probed and at its largest batch, in turn (so a run stopped by the budget
        or a timeout has complete rows)."""
        ids = self.prompts(self.probe_batch)
        run_hf(self.model, ids, 2)  # warm-up
        hf_probe = measure(lambda: run_hf(self.model, ids, self.args.new), self.mem)
        self.log(f"{HF} probe: {hf_probe}")
        start, t0 = self.mem and self.mem.start(), time.perf_counter()
        self.decoder = self.capture(self.probe_batch)
        self.capture_info = dict(capture_s=time.perf_counter() - t0,
                                 capture_bytes=self.mem and self.mem.peak_since(start))
        self.log(f"captured at batch {self.probe_batch}: {self.capture_info}")
        self.reference = check_reference(self.model, self.probe_batch, self.config["vocab_size"], self.device)
        probes = {recipe: self.probe(recipe, ids) for recipe in CHECKED}
        self.require_checks()
        self.add_row(HF, hf_probe)
        for recipe in self.recipes:
            if probes.get(recipe) is None:
                if self.elapsed() > self.args.budget_s:
                    self.doc["rows"].append(dict(name=recipe, skipped="budget spent before its probe"))
                    self.save()
                    continue
                probes[recipe] = self.probe(recipe, ids)
                self.require_checks()
            self.add_row(recipe, probes[recipe])
        return self.doc


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--recipes", default="gear-4bit,kivi-4bit", help="comma-separated gearfx recipes")
    parser.add_argument("--prompt", type=int, default=4096, help="prompt tokens per row")
    parser.add_argument("--new", type=int, default=128, help="new tokens per row")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of width 256 (smoke test)")
    parser.add_argument("--eager", action="store_true",
                        help="run gearfx without Inductor (compile(backend_compile=False)): for the CPU smoke test")
    parser.add_argument("--batch", type=int, default=None,
                        help="run every configuration at this batch, no search (needed off CUDA)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip a full-size run whose estimated time would end past this many seconds")
    args = parser.parse_args(argv)
    if args.new < 2:
        parser.error("--new must be at least 2: decode throughput is timed from the first new token to the last")
    if args.batch is None and memory(torch.device(args.device)) is None:
        parser.error(f"the batch search reads the allocator's statistics, which {args.device} has not: give --batch")
    return Bench(args).run()


if __name__ == "__main__":
    main()
