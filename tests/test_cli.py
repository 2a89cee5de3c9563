"""The command line, on the real model (cached after the first fetch)."""

from typer.testing import CliRunner

from gearfx.cli import app

runner = CliRunner()


def test_recipes_and_models_list():
    out = runner.invoke(app, ["recipes"])
    assert out.exit_code == 0 and "gear-4bit" in out.stdout and "kivi-2bit" in out.stdout
    out = runner.invoke(app, ["models", "list"])
    assert out.exit_code == 0 and "smollm2-135m" in out.stdout


def test_generate_streams_text_and_reports_memory():
    out = runner.invoke(app, ["generate", "--prompt", "The capital of France is", "--recipe", "gear-4bit",
                              "--max-new-tokens", "4", "--max-cache-len", "64", "--no-compile"])
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("The capital of France is Paris")
    assert "the fp16 cache" in out.output


def test_eval_rejects_missing_text_and_unknown_model(tmp_path):
    out = runner.invoke(app, ["eval", "--text", str(tmp_path / "nope.txt"), "--no-compile"])
    assert out.exit_code == 2 and "does not exist" in out.output
    out = runner.invoke(app, ["generate", "--prompt", "x", "--model", "no-such-model"])
    assert out.exit_code == 2 and "known aliases: smollm2-135m" in out.output


def test_eval_writes_the_documented_json_and_plot(tmp_path):
    import json

    out_json, out_png = tmp_path / "q.json", tmp_path / "p.png"
    out = runner.invoke(app, ["eval", "--recipe", "kivi-4bit", "--tokens", "8", "--prefill", "24",
                              "--json", str(out_json), "--plot", str(out_png), "--per-layer", "--no-compile"])
    assert out.exit_code == 0, out.output
    data = json.loads(out_json.read_text())
    assert set(data) == {"model", "text", "tokens", "prefill", "results"} and data["tokens"] == 8
    assert [r["recipe"] for r in data["results"]] == ["fp16", "kivi-4bit"]
    assert set(data["results"][0]) == {"recipe", "ppl", "ppl_delta_pct", "kl", "kv_bytes_per_token",
                                       "kv_bytes_ratio", "top1_agreement"}
    assert "layer 29  K" in out.stdout and out_png.stat().st_size > 1000
    out = runner.invoke(app, ["plot", str(out_json), "--out", str(tmp_path / "p2.png"),
                              "--extra", f"peers={out_json}"])
    assert out.exit_code == 0 and (tmp_path / "p2.png").is_file(), out.output
    assert "| kivi-4bit | " in out.stdout and "none | | | NO" in out.stdout  # no gearfx recipe to beat it

    # a second run over another recipe merges into one table; the same recipe twice does not
    other = tmp_path / "q2.json"
    out = runner.invoke(app, ["eval", "--recipe", "lossless", "--tokens", "8", "--prefill", "24",
                              "--json", str(other), "--no-compile"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["merge", str(out_json), str(other), "--json", str(tmp_path / "m.json")])
    assert out.exit_code == 0, out.output
    merged = json.loads((tmp_path / "m.json").read_text())
    assert [r["recipe"] for r in merged["results"]] == ["fp16", "kivi-4bit", "lossless"]
    assert "| lossless |" in out.stdout
    out = runner.invoke(app, ["merge", str(out_json), str(out_json), "--json", str(tmp_path / "x.json")])
    assert out.exit_code == 2 and "'kivi-4bit' is in more than one run" in out.output


def test_eval_rejects_short_text_and_unknown_recipe(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    out = runner.invoke(app, ["eval", "--text", str(short), "--tokens", "100", "--no-compile"])
    assert out.exit_code == 2 and "were asked for" in out.output
    out = runner.invoke(app, ["eval", "--recipe", "no-such-recipe"])
    assert out.exit_code == 2 and "unknown recipe" in out.output


def test_passkey_reports_accuracy_next_to_fp16(tmp_path):
    out = runner.invoke(app, ["passkey", "--recipe", "kivi-4bit", "--lengths", "80", "--depths", "0.5",
                              "--json", str(tmp_path / "pk.json")])
    assert out.exit_code == 0, out.output
    assert "| fp16 | 100%" in out.stdout and "| kivi-4bit |" in out.stdout
    out = runner.invoke(app, ["passkey", "--lengths", "20"])
    assert out.exit_code == 2 and "cannot hold the passkey prompt" in out.output
