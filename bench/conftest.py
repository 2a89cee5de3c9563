"""Options, shared state and the JSON section of the gearfx benchmark suite (see the README, section Benchmarks).

Models are compiled once per (recipe, context length) and kept only while tests of that context
run, so the full run fits in memory. Quality is scored once per run, for all recipes in lockstep
(gearfx.evaluate) and for all peers in lockstep (gearfx.peers), and attached to the decode tests'
`extra_info`; the peers' rows (with the reason for any peer that could not run) also go into the
JSON under "gearfx".
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import os
import platform
import warnings
from pathlib import Path

import pytest
import torch

import gearfx
from gearfx import evaluate as ev
from gearfx import models as model_store
from gearfx import peers
from gearfx.diagnostics import capture_kv

MODEL = "smollm2-135m"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw_test.txt"

# The quick subset (CI): a few recipes that cover the three cache kinds (uncompressed, chunked
# compression, eviction with per-token compression), one context, eager execution (Inductor takes
# 30-70 s per recipe to compile SmolLM2), and the peers that need no other environment.
QUICK = dict(recipes=["fp16", "gear-4bit", "gear-4bit-h2o"], contexts=[256], quality_context=256,
             quality_prefill=192, peers=["hf-dynamic", "hf-quanto-4bit", "hf-hqq-4bit", "hf-fp8"],
             decode_rounds=8, prefill_rounds=2)
FULL = dict(recipes=None, contexts=[512, 1024, 2048], quality_context=1024, quality_prefill=512,
            peers=list(peers.PEERS), decode_rounds=16, prefill_rounds=3)


def pytest_addoption(parser):
    g = parser.getgroup("gearfx bench")
    g.addoption("--quick", action="store_true", help="the CI subset (< 5 min): " + str(QUICK))
    g.addoption("--recipes", help="comma-separated recipes (default: every shipped recipe; quick: "
                                  f"{','.join(QUICK['recipes'])}); fp16 is always added")
    g.addoption("--contexts", help="comma-separated context lengths (cache capacities) for latency")
    g.addoption("--quality-context", type=int, help="tokens scored for quality, prefill included")
    g.addoption("--quality-prefill", type=int, help="tokens prefilled before scoring starts")
    g.addoption("--peers", help=f"comma-separated peers (known: {','.join(peers.PEERS)}; 'none' for none)")
    g.addoption("--kvpress-python", default=os.environ.get("GEARFX_KVPRESS_PYTHON"),
                help="a Python that has kvpress (it pins transformers<5.3), for its presses; "
                     "default $GEARFX_KVPRESS_PYTHON")
    g.addoption("--backend-compile", action="store_true",
                help="compile with Inductor (real latency; 30-70 s per recipe and context to compile)")


@dataclasses.dataclass
class Settings:
    recipes: list[str]
    contexts: list[int]
    quality_context: int
    quality_prefill: int
    peers: list[str]
    decode_rounds: int
    prefill_rounds: int
    backend_compile: bool
    kvpress_python: str | None
    quick: bool


def _list(value: str | None) -> list[str] | None:
    return None if value is None else [x.strip() for x in value.split(",") if x.strip()]


def settings_from(config) -> Settings:
    base = QUICK if config.getoption("--quick") else FULL
    shipped = gearfx.list_recipes()
    if _list(config.getoption("--recipes")):
        recipes = _list(config.getoption("--recipes"))
    elif base["recipes"]:  # the quick set, less any recipe no longer shipped
        recipes = [r for r in base["recipes"] if r in shipped]
    else:
        recipes = shipped
    recipes = [ev.REFERENCE] + [r for r in recipes if r != ev.REFERENCE]
    contexts = [int(c) for c in _list(config.getoption("--contexts")) or base["contexts"]]
    chosen_peers = _list(config.getoption("--peers"))
    chosen_peers = base["peers"] if chosen_peers is None else [p for p in chosen_peers if p != "none"]
    q_ctx = config.getoption("--quality-context") or base["quality_context"]
    q_pre = config.getoption("--quality-prefill") or min(base["quality_prefill"], q_ctx // 2)
    if q_ctx not in contexts:
        contexts = sorted(contexts + [q_ctx])
    return Settings(recipes, contexts, q_ctx, q_pre, chosen_peers, base["decode_rounds"],
                    base["prefill_rounds"], config.getoption("--backend-compile"),
                    config.getoption("--kvpress-python"), config.getoption("--quick"))


def pytest_configure(config):
    # Inductor CPU code ran ~50x slower with 2 OpenMP threads than with 1 on this machine, and
    # other jobs share the cores: pin one thread so ratios are stable.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", module="torchao")
    config.gearfx_settings = settings_from(config)


def pytest_generate_tests(metafunc):
    s: Settings = metafunc.config.gearfx_settings
    if "step_case" in metafunc.fixturenames:
        # Context-major order: every model of one context is compiled, measured and released
        # before the next context's.
        cases = [(c, r, m) for c in s.contexts for r in s.recipes for m in ("decode", "prefill")]
        metafunc.parametrize("step_case", cases, ids=[f"{m}-ctx{c}-{r}" for c, r, m in cases])
    if "peer_case" in metafunc.fixturenames:
        names = [peers.REFERENCE] + [x for x in s.peers if x != peers.REFERENCE] if s.peers else []
        cases = [(c, p, m) for c in s.contexts for p in names for m in ("decode", "prefill")]
        metafunc.parametrize("peer_case", cases, ids=[f"{m}-ctx{c}-{p}" for c, p, m in cases])
    if "compress_recipe" in metafunc.fixturenames:
        compressing = [r for r in s.recipes if gearfx.load_recipe(r).compresses]
        metafunc.parametrize("compress_recipe", compressing)


class BenchState:
    """Everything the tests share: the model, the tokens, compiled models, quality results."""

    def __init__(self, settings: Settings):
        self.s = settings
        self.model, self.tokenizer = model_store.load(MODEL)
        need = max(max(settings.contexts), settings.quality_context)
        self.ids = ev.read_tokens(self.tokenizer, TEXT, need)
        self._compiled: dict[tuple[str, int], gearfx.CompiledModel] = {}
        self._context: int | None = None
        self._decoder = None  # the model captured at self._context
        self.quality: dict[str, ev.Result] | None = None
        self.peer_results: list[peers.PeerResult] | None = None
        self.baselines: dict[str, float] = {}  # group -> median seconds of the fp16 recipe
        self._kv = None

    def chunk_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Real keys and values of every layer, [1, H_kv, T, D], T = the longest recipe window."""
        if self._kv is None:
            longest = max(gearfx.load_recipe(r).window for r in self.s.recipes)
            self._kv = capture_kv(self.model, self.ids[:, :longest])
        return self._kv

    def compiled(self, recipe: str, context: int) -> gearfx.CompiledModel:
        if context != self._context:  # release the previous context's models
            self._compiled.clear()
            self._context = context
            self._decoder = gearfx.capture(self.model, max_cache_len=context, batch_size=1)
        if (recipe, context) not in self._compiled:
            self._compiled[(recipe, context)] = gearfx.compile(
                self._decoder, recipe, backend_compile=self.s.backend_compile)
        return self._compiled[(recipe, context)]

    def recipe_quality(self) -> dict[str, ev.Result]:
        """gearfx.evaluate over every recipe in lockstep at the quality context (computed once)."""
        if self.quality is None:
            ctx = self.s.quality_context
            models = {r: self.compiled(r, ctx) for r in self.s.recipes}
            results = ev.evaluate(models, self.ids[:, :ctx], self.s.quality_prefill, progress=False)
            self.quality = {r.recipe: r for r in results}
        return self.quality

    def peer_quality(self) -> dict[str, peers.PeerResult]:
        """gearfx.peers over every peer in lockstep at the quality context (computed once); kvpress
        presses in the --kvpress-python environment when given."""
        if self.peer_results is None:
            ctx, pre = self.s.quality_context, self.s.quality_prefill
            ids = self.ids[:, :ctx]
            here = [p for p in self.s.peers if p not in peers.KVPRESS_PEERS or _has_kvpress()]
            results = peers.evaluate_peers(self.model, ids, pre, here, progress=False)
            isolated = [p for p in self.s.peers if p not in here]
            if isolated and self.s.kvpress_python:
                results += peers.run_isolated(self.s.kvpress_python, model_store.resolve(MODEL), ids, pre, isolated)
            elif isolated:
                results += peers.unavailable(isolated)
            self.peer_results = results
        return {r.recipe: r for r in self.peer_results}


def _has_kvpress() -> bool:
    try:
        import kvpress  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def state(request) -> BenchState:
    st = BenchState(request.config.gearfx_settings)
    request.config.gearfx_state = st  # for the JSON hook below
    return st


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "torchao", "optimum-quanto", "hqq", "kvpress"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add the run's settings and every peer row (numbers, or the reason it could not run)."""
    s: Settings = config.gearfx_settings
    st: BenchState | None = getattr(config, "gearfx_state", None)
    output_json["gearfx"] = {
        "model": MODEL, "text": str(TEXT), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "settings": dataclasses.asdict(s), "threads": torch.get_num_threads(), "versions": _versions(),
        "recipes": [dataclasses.asdict(r) for r in (st.quality or {}).values()] if st else [],
        "peers": [dataclasses.asdict(r) for r in (st.peer_results or [])] if st else [],
    }
