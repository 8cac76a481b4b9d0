"""A hub model on this node: the commit the sweep pinned (qfarm.sweep.hub), downloaded once into the shared cache.

Every later use (the float load, the GGUF conversion, the checkpoint's size, vLLM) reads the snapshot folder
like any local model folder. The token (``HF_TOKEN``) is in the environment the scheduler handed this worker
(qfarm.farm.handoff); it is never read from Redis or written anywhere.

Sample yaml::

    model: HuggingFaceTB/SmolLM2-135M-Instruct
    revision: main            # resolved to a commit sha at submit; the job ids carry it
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from qfarm.errors import Permanent
from qfarm.sweep.hub import SHA, TOKEN_ENV, cache_dir, repo_folder

# what a model job needs of a repo: config, tokenizer, weights (one format), chat template, generation config, and
# the model card (its license goes into the cards of what qfarm makes of it: workers.shared.card)
WANTED = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*", "README.md"]  # its card: the license
SKIPPED = ["original/*", "onnx/*", "openvino/*", "coreml/*", "*.gguf", "*.onnx", "*.onnx_data", "*.msgpack",
           "*.h5", "*.ot", "*.tflite", "*.mlmodel"]


def weights_wanted(files: list[str]) -> list[str]:
    """safetensors when the repo has them, else PyTorch .bin: never both (that would download it twice)."""
    return ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]


def snapshot(model: dict, output_root: str, progress=lambda line: None) -> tuple[str, float]:
    """(the local snapshot folder of the pinned commit, seconds spent downloading now: 0 when it was cached)."""
    from huggingface_hub import HfApi, errors, snapshot_download

    repo, sha = model["location"], model.get("revision") or ""
    if not SHA.match(sha):
        raise Permanent(f"hub model {repo} was queued without a pinned commit (an older qfarm): submit the sweep again")
    cache = cache_dir(output_root)  # QFARM_HUB_CACHE (this node's, or forwarded by submit), else <root>/_hub
    folder = repo_folder(cache, repo) / "snapshots" / sha
    start = time.time()
    try:
        if (folder / "config.json").is_file() and _has_weights(folder):
            path = snapshot_download(repo, revision=sha, cache_dir=str(cache), local_files_only=True)
            return path, 0.0
        progress(f"downloading {repo}@{sha[:10]} from the hub into {cache}")
        files = HfApi().list_repo_files(repo, revision=sha)
        path = snapshot_download(repo, revision=sha, cache_dir=str(cache), allow_patterns=WANTED + weights_wanted(files),
                                 ignore_patterns=SKIPPED)
    except errors.OfflineModeIsEnabled:
        raise Permanent(f"HF_HUB_OFFLINE is set and the hub cache has no {folder} with weights: download "
                        f"{repo} at {sha} into {cache} first, or unset HF_HUB_OFFLINE") from None
    except (errors.GatedRepoError, errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
        raise Permanent(f"hub model {repo}@{sha[:10]}: {type(e).__name__}"
                        f"{'' if token_set() else ' (no HF_TOKEN reached this worker)'}") from None
    return path, time.time() - start


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def token_set() -> bool:
    """Whether a hub token reached this worker (its value is never read here, only that it is there)."""
    return any(os.environ.get(k) for k in TOKEN_ENV)
