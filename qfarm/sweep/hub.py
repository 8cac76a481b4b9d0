"""Hub models as users have them: a hub id pinned to a commit, one download cache, and a token that stays secret.

- **Pinned.** ``model: org/name`` with ``revision:`` (a branch, tag or commit; default ``main``) is resolved to the
  commit sha when the sweep is validated or submitted (``huggingface_hub``'s ``resolve_revision``: the hub, or the
  cache's ``refs/`` when the hub is out of reach or ``HF_HUB_OFFLINE=1``). The sha is in the model's key, so in
  every job id (a branch that moves reruns the sweep, it never reuses results of another commit), and in every row
  (``model_revision``). Workers download exactly that commit.
- **One cache.** Workers keep hub downloads in ``<output_root>/_hub`` (the Hugging Face cache layout,
  ``models--org--name/snapshots/<sha>/``), or where ``QFARM_HUB_CACHE`` says: every worker of a node shares it
  (and every node, when the output root is shared), so a sweep downloads a model once. The submitting machine
  looks in the same place to resolve a revision offline.
- **Secrets.** ``HF_TOKEN`` (or the token ``hf auth login`` saved), with offline mode and the cache setting,
  reaches the scheduler and its workers through Ray's object store (``forwarded_env``, qfarm.farm.handoff): never
  Redis, a log line or an argument's value. Not Ray's runtime_env: its agent logs the env vars it sets.

Imports ``huggingface_hub`` only when a hub model is used: the CLI stays light.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from qfarm.farm.keys import DEFAULT_OUTPUT_ROOT

HUB_CACHE_ENV = "QFARM_HUB_CACHE"
DEFAULT_REVISION = "main"
SHA = re.compile(r"^[0-9a-f]{40}$")
# a branch, tag or PR ref (refs/pr/1) as the hub names them; no "..", no leading "/" (it names a file in refs/)
REVISION = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][\w.\-/]{0,199}$")
# what the scheduler and workers get from the submitting shell, through Ray's object store (never Redis, logs)
FORWARDED_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_ENDPOINT", HUB_CACHE_ENV)
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class HubError(ValueError):
    """A hub model that cannot be pinned: why, and what to do; ``field`` is the spec key at fault."""

    def __init__(self, message: str, field: str = "model"):
        super().__init__(message)
        self.field = field


def cache_dir(output_root: str | Path | None, env=None) -> Path:
    """Where hub downloads live: ``QFARM_HUB_CACHE``, else ``<output_root>/_hub`` (the output root
    ``qfarm submit`` would use when none is given)."""
    env = os.environ if env is None else env
    named = env.get(HUB_CACHE_ENV)
    if named:
        return Path(named).expanduser().resolve()
    root = output_root or env.get("QFARM_OUTPUT_ROOT") or DEFAULT_OUTPUT_ROOT
    return Path(root).expanduser().resolve() / "_hub"


def repo_folder(cache: Path, repo: str) -> Path:
    """The cache folder of a model repo (the Hugging Face layout)."""
    return cache / f"models--{repo.replace('/', '--')}"


def resolve(repo: str, revision: str | None, cache: Path) -> str:
    """The commit sha ``revision`` of hub model ``repo`` is now, or HubError saying why not and what to do."""
    revision = revision or DEFAULT_REVISION
    if not REVISION.match(revision):
        raise HubError(f"revision {revision!r} is not a branch, tag or commit name", "revision")
    if SHA.match(revision):
        return revision  # a commit is its own pin: nothing to ask
    try:
        from huggingface_hub import HfApi, errors
    except ImportError:
        raise HubError(f"pinning hub model {repo}@{revision} to a commit needs huggingface_hub "
                       "(pip install huggingface_hub), or give revision: a 40-hex commit sha") from None
    ref = repo_folder(cache, repo) / "refs" / revision

    def out_of_reach(why: str) -> HubError:
        return HubError(f"cannot pin hub model {repo}@{revision} to a commit: the hub is out of reach{why} and the "
                        f"cache has no {ref}. Give revision: a 40-hex commit sha, or download the model into the cache "
                        f"first (hf download {repo} --revision {revision} --cache-dir {cache})")

    if not reachable():  # the cache's ref, at once, instead of ~23 s of retries before the same answer
        sha = ref.read_text().strip() if ref.is_file() else ""
        if SHA.match(sha):
            return sha
        raise out_of_reach("")
    try:
        resolved = HfApi().resolve_revision(repo, revision=revision, cache_dir=str(cache))
    except errors.GatedRepoError:
        raise HubError(f"hub model {repo} is gated: accept its terms on its hub page, then set HF_TOKEN "
                       "(or run `hf auth login`) where you submit") from None
    except errors.RepositoryNotFoundError:
        raise HubError(f"no hub model {repo!r} (or it is private: set HF_TOKEN where you submit)") from None
    except errors.RevisionNotFoundError:
        raise HubError(f"hub model {repo} has no revision {revision!r} (a branch, tag or commit)", "revision") from None
    except (errors.RevisionResolutionError, OSError) as e:
        raise out_of_reach(f" ({_reason(e)})") from None
    sha = getattr(resolved, "resolved", None) or str(resolved)
    if not SHA.match(sha):
        raise HubError(f"hub model {repo}@{revision} resolved to {sha!r}, which is not a commit sha")
    return sha


def _reason(e: BaseException) -> str:
    """The root cause, short: "ConnectError: [Errno -2] Name or service not known"."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split())
    text = (text[:120] + "…") if len(text) > 120 else text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def snapshot(cache: Path, repo: str, sha: str) -> Path | None:
    """The cached snapshot folder of ``repo`` at commit ``sha`` when its config.json is there (no download)."""
    folder = repo_folder(cache, repo) / "snapshots" / sha
    return folder if (folder / "config.json").is_file() else None


def reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's endpoint answers a TCP connection within ``timeout`` (and HF_HUB_OFFLINE is not set):
    validation asks before fetching a config, since huggingface_hub backs off and retries for ~23 s on a machine
    with no network before it gives up."""
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        port = url.port or (443 if url.scheme == "https" else 80)
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def config_folder(cache: Path, repo: str, sha: str) -> Path | None:
    """A folder holding the model's config.json at ``sha``, for reading its architecture at validate time: the
    cached snapshot, or config.json alone fetched into the cache (a few KB). None where neither is possible."""
    found = snapshot(cache, repo, sha)
    if found is not None:
        return found
    if not reachable():
        return None  # offline: huggingface_hub would retry for ~23 s before saying so
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo, "config.json", revision=sha, cache_dir=str(cache))).parent
    except Exception:  # noqa: BLE001 - offline, gated, no network: validation falls back to fewer checks
        return None


def forwarded_env(env=None, token: str | None = None) -> dict[str, str]:
    """The hub settings the scheduler and its workers get through Ray's object store (qfarm.farm.handoff): the token,
    offline mode, a mirror endpoint, the cache; ``token`` (the one ``hf auth login`` saved) when the environment
    names none."""
    env = os.environ if env is None else env
    out = {k: env[k] for k in FORWARDED_ENV if env.get(k)}
    if token and not any(out.get(k) for k in TOKEN_ENV):
        out["HF_TOKEN"] = token
    if HUB_CACHE_ENV in out:
        out[HUB_CACHE_ENV] = str(Path(out[HUB_CACHE_ENV]).expanduser().resolve())
    return out


def apply_env(env: dict) -> dict[str, str]:
    """Set the forwarded variables (``FORWARDED_ENV`` only, whatever else ``env`` holds) in this process, before
    huggingface_hub reads them (it reads HF_HUB_OFFLINE once, at import: set here too if it was imported)."""
    import sys

    env = {k: str(v) for k, v in (env or {}).items() if k in FORWARDED_ENV and v}
    os.environ.update(env)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None and "HF_HUB_OFFLINE" in env:
        constants.HF_HUB_OFFLINE = env["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}
    return env


def saved_token() -> str | None:
    """The token ``hf auth login`` saved on this machine, if huggingface_hub is here and one was saved."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return None
    try:
        return get_token()
    except Exception:  # noqa: BLE001 - an unreadable token file is no token
        return None
