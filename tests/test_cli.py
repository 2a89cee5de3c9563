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
