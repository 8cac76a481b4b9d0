"""Getting a base model into a form every method can start from: a float Hugging Face folder.

A GGUF source (the bundled SmolLM2 is a Q4_1 GGUF) is dequantized by transformers once and saved as float32
safetensors under ``<output_root>/_models/``; every later load, by any worker or method, reads that folder
(~1 s instead of ~30 s). A hub id is passed to transformers as is.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import time
from pathlib import Path


def quiet() -> None:
    """Silence progress bars and known-harmless warnings in worker logs."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    warnings.filterwarnings("ignore", message=".*inputs will be cast.*")


def preload() -> None:
    """Import the ML stack now (~5 s on 2 cores), so a worker pays it while starting, not in its first job."""
    import importlib.util

    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: F401

    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401
    quiet()


def base_dir(model: dict, output_root: str) -> tuple[str, float]:
    """A loadable float HF folder (or hub id) for ``model``, and seconds spent preparing it now (0 if ready)."""
    if model["kind"] in ("hf_dir", "hub"):
        return model["location"], 0.0
    key = hashlib.sha256(model["key"].encode()).hexdigest()[:16]
    target = Path(output_root) / "_models" / key
    if (target / "config.json").is_file():
        return str(target), 0.0
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(str(target) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two workers on one node materialize it once
        if (target / "config.json").is_file():
            return str(target), 0.0
        start = time.time()
        _materialize_gguf(model["location"], model["gguf_file"], target)
        return str(target), time.time() - start


def _materialize_gguf(folder: str, gguf_file: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model keeps its gguf quantizer, which refuses to save; drop it (BACKENDS.md).
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "QFARM_SOURCE.txt").write_text(f"dequantized to float32 from {folder}/{gguf_file}\n")
    os.replace(tmp, target)


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_label() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return "cpu"


def load_float(path: str):
    """The float model and tokenizer from an HF folder or hub id, on this worker's device."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device() == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map={"": device()})
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def tensor_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights are shared)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


def dir_bytes(path: str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
