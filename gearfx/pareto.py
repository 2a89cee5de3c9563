"""The quality-vs-memory Pareto plot: perplexity change against KV bytes, one point per recipe.

Inputs are result JSON files as `gearfx eval --json` writes them ({"results": [{"recipe",
"ppl_delta_pct", "kv_bytes_ratio", ...}]}); peers measured on the same protocol (HF
QuantizedCache, kvpress) can be added as extra files with the same fields and are drawn with
their own marker and label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

REFERENCE = "fp16"
REFERENCES = (REFERENCE, "hf-dynamic")  # the uncompressed baselines: gearfx's and the peers'
# The faithful reproductions of published methods: the references gearfx's own recipes must beat.
PAPER_RECIPES = ("kivi-4bit", "kivi-2bit", "gear-paper-4bit", "gear-paper-2bit", "h2o")


def load_points(path: str | Path) -> list[dict]:
    """The result records of one eval JSON file; a clear error if the file lacks the fields."""
    data = json.loads(Path(path).read_text())
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, list):
        raise ValueError(f"{str(path)!r} has no 'results' list (an eval JSON file is expected)")
    for r in results:
        missing = {"recipe", "ppl_delta_pct", "kv_bytes_ratio"} - set(r)
        if missing:
            raise ValueError(f"{str(path)!r}: result {r.get('recipe')!r} lacks {', '.join(sorted(missing))}")
    return results


def points(path: str | Path) -> list[dict]:
    """The compressed points of one results file: no uncompressed baseline, no peer that failed."""
    return [p for p in load_points(path) if p["recipe"] not in REFERENCES and p.get("error") is None]


def front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both bytes and perplexity, by increasing bytes."""
    best = []
    for p in sorted(points, key=lambda p: (p["kv_bytes_ratio"], p["ppl_delta_pct"])):
        if not best or p["ppl_delta_pct"] < best[-1]["ppl_delta_pct"]:
            best.append(p)
    return best


def rivals(ours: list[dict], others: list[dict]) -> list[tuple[dict, dict | None]]:
    """For each other point (a faithful paper recipe or a peer), the best of `ours` at no more bytes:
    the one with the lowest perplexity; None if none of ours is that small. The Pareto claim holds
    when each such best has a lower ppl delta than the point it is paired with."""
    out = []
    for o in others:
        fit = [p for p in ours if p["kv_bytes_ratio"] <= o["kv_bytes_ratio"]]
        out.append((o, min(fit, key=lambda p: p["ppl_delta_pct"]) if fit else None))
    return out


def rivals_table(results: str | Path, extra: Iterable[str | Path] = ()) -> str:
    """Markdown: each paper recipe in `results` and each point in the `extra` files (peers) next
    to `rivals`' best gearfx recipe at no more bytes, and whether that one has the lower ppl."""
    mine = points(results)
    ours = [p for p in mine if p["recipe"] not in PAPER_RECIPES]
    others = [p for p in mine if p["recipe"] in PAPER_RECIPES] + [p for path in extra for p in points(path)]
    rows = ["| reference point | bytes | ppl delta | best gearfx recipe at <= bytes | bytes | ppl delta | lower ppl |",
            "|---|---|---|---|---|---|---|"]
    for o, best in rivals(ours, others):
        cells = (f"{best['recipe']} | {best['kv_bytes_ratio']:.3f} | {best['ppl_delta_pct']:+.2f}% | "
                 f"{'yes' if best['ppl_delta_pct'] < o['ppl_delta_pct'] else 'NO'}") if best else "none | | | NO"
        rows.append(f"| {o['recipe']} | {o['kv_bytes_ratio']:.3f} | {o['ppl_delta_pct']:+.2f}% | {cells} |")
    return "\n".join(rows)


def plot(results: str | Path, out: str | Path, extra: Iterable[tuple[str, str | Path]] = (),
         title: str | None = None) -> Path:
    """Draw ppl delta (%, symlog) vs KV bytes ratio for the recipes in `results`, with the gearfx
    Pareto front, plus each (label, json path) in `extra` as its own series; save to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = points(results)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.scatter([p["kv_bytes_ratio"] for p in ours], [p["ppl_delta_pct"] for p in ours],
               color="tab:blue", zorder=3, label="gearfx recipes")
    for p in ours:
        ax.annotate(p["recipe"], (p["kv_bytes_ratio"], p["ppl_delta_pct"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    best = front(ours)
    ax.plot([p["kv_bytes_ratio"] for p in best], [p["ppl_delta_pct"] for p in best], color="tab:blue",
            alpha=0.4, drawstyle="steps-post", label="gearfx Pareto front")
    for (label, path), marker in zip(extra, "s^vDP*X"):
        pts = points(path)
        ax.scatter([p["kv_bytes_ratio"] for p in pts], [p["ppl_delta_pct"] for p in pts], marker=marker,
                   zorder=3, label=label)
        for p in pts:
            ax.annotate(p["recipe"], (p["kv_bytes_ratio"], p["ppl_delta_pct"]), textcoords="offset points",
                        xytext=(5, -10), fontsize=7)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("KV cache bytes vs an fp16 cache")
    ax.set_ylabel("perplexity change vs fp16 (%, symlog)")
    ax.set_title(title or "Quality vs KV memory (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=130)
    plt.close(fig)
    return out
