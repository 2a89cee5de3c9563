"""ExecuTorch through optimum-executorch with a gearfx recipe: the .pte runs in the ExecuTorch
runtime and matches gearfx's compiled model; its memory plan holds the compressed cache.

Runs in the export environment (`make export-env`, then `make test-export`): optimum-executorch
1.1.0 pins transformers 5.0.0rc1, so the main environment cannot import it.
"""

import pytest
import torch

pytest.importorskip("optimum.executorch", reason="needs the export environment: make export-env")

import gearfx  # noqa: E402
import gearfx.exporters.executorch as gx_et  # noqa: E402  (registers the gearfx recipes)
from executorch.runtime import Runtime  # noqa: E402
from optimum.exporters.executorch import main_export  # noqa: E402
from tests import tiny  # noqa: E402

CAPACITY, PROMPT, STEPS = 1024, 60, 6  # window 64: decode step 4 closes a chunk; at 1024 the fp window is not most of the cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny.hf("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    """(optimum recipe, gearfx recipe) -> (.pte path, ExecutorchProgramManager), via main_export."""
    out = {}

    def get(recipe, gearfx_recipe):
        if (recipe, gearfx_recipe) not in out:
            folder = tmp_path_factory.mktemp(f"{recipe}-{gearfx_recipe}")
            programs = main_export(str(model_dir), "text-generation", recipe, folder, max_seq_len=CAPACITY,
                                   recipe_kwargs={"gearfx_recipe": gearfx_recipe})
            out[recipe, gearfx_recipe] = folder / "model.pte", programs["model"]
        return out[recipe, gearfx_recipe]
    return get


def test_pte_logits_match_the_compiled_model(model_dir, exported):
    pte, _ = exported("gearfx_xnnpack", "gear-4bit")
    method = Runtime.get().load_program(str(pte)).load_method("forward")
    model = tiny.hf("llama")
    compiled = gearfx.compile(model, "gear-4bit", max_cache_len=CAPACITY, batch_size=1)
    ids = torch.randint(1, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    got, want = method.execute([ids, torch.arange(PROMPT)])[0], compiled.prefill(ids)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    token = want[:, -1].argmax(-1)
    for step in range(STEPS):
        assert torch.equal(got[:, -1].argmax(-1), token)  # greedy tokens equal
        got = method.execute([token[:, None], torch.tensor([PROMPT + step])])[0]
        want = compiled.decode(token[:, None])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
        token = want[:, -1].argmax(-1)
    assert torch.equal(got[:, -1].argmax(-1), token)


def test_planned_kv_memory_is_the_compressed_cache(exported):
    gear = gx_et.planned_state_bytes(exported("gearfx_xnnpack", "gear-4bit")[1])
    fp = gx_et.planned_state_bytes(exported("gearfx_portable", "fp16")[1])
    compiled = gearfx.compile(tiny.hf("llama"), "gear-4bit", max_cache_len=CAPACITY, batch_size=1,
                              backend_compile=False)
    exact = compiled.memory_report().total  # the state tensors' bytes
    assert exact <= gear <= exact + 16 * 34  # 34 state buffers (17 a layer), each aligned to 16 bytes
    # fp16 keeps this float32 model's cache in float32: compare with a true fp16 cache as well
    assert gear <= 0.40 * fp / 2
    assert gear <= 0.40 * fp


def test_unsupported_combination_names_what_is_unsupported(model_dir, tmp_path):
    with pytest.raises(gx_et.UnsupportedExportError, match="h2o"):
        main_export(str(model_dir), "text-generation", "gearfx_portable", tmp_path, max_seq_len=CAPACITY,
                    recipe_kwargs={"gearfx_recipe": "gear-4bit-h2o"})
    with pytest.raises(gx_et.UnsupportedExportError, match="use_custom_kv_cache"):
        main_export(str(model_dir), "text-generation", "gearfx_portable", tmp_path, max_seq_len=CAPACITY,
                    use_custom_sdpa=True, use_custom_kv_cache=True, recipe_kwargs={"gearfx_recipe": "gear-4bit"})
