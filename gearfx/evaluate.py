"""Quality through the compressed cache: perplexity, KL to the uncompressed run, top-1 agreement.

Every scored logit comes from the cache: the first `prefill` tokens are prefilled, then the rest are
fed one token at a time, so each prediction after the first reads the compressed state (a single
full forward pass would never read the cache and would measure nothing). All recipes run in
lockstep with the `fp16` reference, so the KL divergence is exact without storing distributions.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from gearfx.runtime import CompiledModel

REFERENCE = "fp16"


@dataclasses.dataclass(frozen=True)
class Result:
    recipe: str
    ppl: float
    ppl_delta_pct: float  # relative to the fp16 recipe on the same tokens
    kl: float  # mean KL(fp16 || recipe) of the next-token distributions
    top1_agreement: float  # fraction of positions whose argmax equals the fp16 run's
    kv_bytes_per_token: float  # compressed cache bytes per cached token (all layers, K and V)
    kv_bytes_ratio: float  # against an fp16 cache of the same capacity


def read_tokens(tokenizer, text: str | Path, count: int) -> torch.Tensor:
    """The first `count` tokens of a text file, [1, count]; a clear error if it is shorter."""
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt").input_ids
    if ids.shape[1] < count:
        raise ValueError(f"{str(path)!r} has {ids.shape[1]} tokens; {count} were asked for")
    return ids[:, :count]


@torch.no_grad()
def evaluate(models: dict[str, CompiledModel], ids: torch.Tensor, prefill: int,
             progress: bool = True) -> list[Result]:
    """Score ids [1, N] with every model (recipe name -> compiled model; must include "fp16").

    The first prediction scored is of token `prefill` (from the prefill's last logit); then each
    token is decoded and predicts the next, through the cache.
    """
    if REFERENCE not in models:
        raise ValueError(f"evaluation needs the {REFERENCE!r} recipe as the reference")
    n = ids.shape[1]
    if not 0 < prefill < n:
        raise ValueError(f"prefill={prefill} must be between 1 and the {n} tokens - 1")
    nll = {k: 0.0 for k in models}
    kl = {k: 0.0 for k in models}
    agree = {k: 0 for k in models}
    logits = {k: m.prefill(ids[:, :prefill])[:, -1] for k, m in models.items()}
    steps = range(prefill, n)
    for pos in tqdm(steps, desc="scoring through the cache", disable=not progress, unit="tok"):
        target = ids[0, pos]
        ref = logits[REFERENCE].float().log_softmax(-1)[0]
        for k in models:
            lp = logits[k].float().log_softmax(-1)[0]
            nll[k] -= lp[target].item()
            kl[k] += (ref.exp() * (ref - lp)).sum().item()
            agree[k] += int(lp.argmax() == ref.argmax())
        if pos + 1 < n:
            logits = {k: m.decode(ids[:, pos : pos + 1])[:, -1] for k, m in models.items()}
    count = len(steps)
    ref_ppl = math.exp(nll[REFERENCE] / count)
    results = []
    for k, m in models.items():
        report = m.memory_report()
        ppl = math.exp(nll[k] / count)
        results.append(Result(
            recipe=k, ppl=ppl, ppl_delta_pct=100 * (ppl / ref_ppl - 1), kl=kl[k] / count,
            top1_agreement=agree[k] / count,
            kv_bytes_per_token=report.total / (m.batch_size * m.max_cache_len),
            kv_bytes_ratio=report.ratio))
    return results


def table(results: list[Result]) -> str:
    """A Markdown table of results."""
    rows = ["| recipe | ppl | ppl delta | KL | top-1 agree | KV bytes/token | KV bytes vs fp16 |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r.recipe} | {r.ppl:.3f} | {r.ppl_delta_pct:+.2f}% | {r.kl:.4f} | "
                    f"{100 * r.top1_agreement:.1f}% | {r.kv_bytes_per_token:.0f} | {r.kv_bytes_ratio:.3f} |")
    return "\n".join(rows)


def merge(runs: list[dict]) -> dict:
    """One eval JSON document from several (`gearfx eval --json` outputs over different recipes, e.g.
    run in parallel): they must share model, text, tokens and prefill and agree on the fp16
    reference (the same tokens give the same ppl); the first run's fp16 row is kept, and a recipe
    in two runs is an error."""
    if not runs:
        raise ValueError("nothing to merge")
    keys = ("model", "text", "tokens", "prefill")
    out = {k: runs[0][k] for k in keys} | {"results": []}
    seen: dict[str, float] = {}
    for i, run in enumerate(runs):
        differ = [k for k in keys if run[k] != out[k]]
        if differ:
            raise ValueError(f"run {i} differs from run 0 in {', '.join(differ)}: not the same protocol")
        for r in run["results"]:
            name = r["recipe"]
            if name == REFERENCE and name in seen:
                if not math.isclose(r["ppl"], seen[name], rel_tol=1e-4):
                    raise ValueError(f"run {i}'s fp16 ppl {r['ppl']} differs from {seen[name]}: not the "
                                     "same tokens or model")
                continue
            if name in seen:
                raise ValueError(f"recipe {name!r} is in more than one run")
            seen[name] = r["ppl"]
            out["results"].append(r)
    return out


def compile_all(factory: Callable[[str], CompiledModel], recipes: list[str]) -> dict[str, CompiledModel]:
    """Compiled models for `recipes`, with the fp16 reference first."""
    names = [REFERENCE] + [r for r in recipes if r != REFERENCE]
    return {name: factory(name) for name in names}
