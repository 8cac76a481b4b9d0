"""Hub models pinned to a commit (qfarm.sweep.hub): resolution through the hub cache's refs with HF_HUB_OFFLINE=1, the
sha in the job ids, the errors a user gets, and what reaches the workers' environment."""

from __future__ import annotations

import textwrap

import pytest

from qfarm.errors import SpecError
from qfarm.sweep import hub
from qfarm.sweep.expand import load_sweep

SHA_A, SHA_B = "a" * 40, "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo="acme/tiny", refs=None, config='{"model_type": "llama"}'):
    """A hub cache laid out as huggingface_hub writes it: refs/<name> holds a sha, snapshots/<sha>/ the files."""
    folder = hub.repo_folder(cache, repo)
    for name, sha in (refs or {"main": SHA_A}).items():
        (folder / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / name).write_text(sha)
        (folder / "snapshots" / sha).mkdir(parents=True, exist_ok=True)
        (folder / "snapshots" / sha / "config.json").write_text(config)
    return folder


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)


def spec(tmp_path, extra=""):
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: hubby
        model: acme/tiny
        {extra}
        jobs:
          - kind: quantize
            matrix: {{method: [none, bnb-nf4]}}
    """))
    return path


def test_a_commit_sha_is_its_own_pin_and_asks_nothing(tmp_path):
    assert hub.resolve("acme/tiny", SHA_B, tmp_path) == SHA_B  # no cache, no network: nothing to ask


def test_a_branch_resolves_through_the_cache_when_offline(tmp_path, offline):
    cached_repo(tmp_path, refs={"main": SHA_A, "v2": SHA_B})
    assert hub.resolve("acme/tiny", None, tmp_path) == SHA_A
    assert hub.resolve("acme/tiny", "v2", tmp_path) == SHA_B
    with pytest.raises(hub.HubError) as e:
        hub.resolve("acme/tiny", "v3", tmp_path)
    msg = str(e.value)
    assert "acme/tiny@v3" in msg and "refs/v3" in msg and "40-hex commit sha" in msg and e.value.field == "model"
    with pytest.raises(hub.HubError) as e:
        hub.resolve("acme/tiny", "../../etc/passwd", tmp_path)
    assert e.value.field == "revision"


def test_the_sha_is_in_every_job_id_so_a_moved_branch_reruns(tmp_path, offline):
    cache = tmp_path / "cache"
    cached_repo(cache)
    _, plan = load_sweep(spec(tmp_path), cache)
    model = plan.jobs[0].model
    assert model["kind"] == "hub" and model["revision"] == SHA_A and model["revision_asked"] == "main"
    assert model["key"] == f"hub:acme/tiny@{SHA_A}" and "config_dir" not in model  # no local path in a job
    (hub.repo_folder(cache, "acme/tiny") / "refs" / "main").write_text(SHA_B)  # the branch moved on the hub
    (hub.repo_folder(cache, "acme/tiny") / "snapshots" / SHA_B).mkdir()
    _, moved = load_sweep(spec(tmp_path), cache)
    assert {j.id for j in moved.jobs}.isdisjoint(j.id for j in plan.jobs)
    _, pinned = load_sweep(spec(tmp_path, f"revision: {SHA_A}"), cache)  # the old commit, pinned: the old jobs
    assert [j.id for j in pinned.jobs] == [j.id for j in plan.jobs]


def test_an_unpinnable_model_or_a_misplaced_revision_is_a_spec_error_with_its_line(tmp_path, offline):
    with pytest.raises(SpecError) as e:
        load_sweep(spec(tmp_path), tmp_path / "empty-cache")
    (p,) = e.value.problems
    assert p.path == "model" and p.line == 2 and "cannot pin hub model acme/tiny@main" in p.message
    with pytest.raises(SpecError) as e:
        load_sweep(spec(tmp_path, "revision: ../x"), tmp_path / "empty-cache")
    assert [(p.path, p.line) for p in e.value.problems] == [("revision", 3)]
    local = tmp_path / "folder"
    local.mkdir()
    (local / "config.json").write_text("{}")
    path = spec(tmp_path, "revision: main")
    path.write_text(path.read_text().replace("acme/tiny", str(local)))
    with pytest.raises(SpecError) as e:
        load_sweep(path, tmp_path / "empty-cache")
    (p,) = e.value.problems
    assert p.path == "revision" and "remove revision" in p.message


def test_workers_get_the_token_through_the_runtime_env_only():
    env = {"HF_TOKEN": "hf_secret", "HF_HUB_OFFLINE": "1", "PATH": "/bin", "QFARM_HUB_CACHE": "~/hf"}
    out = hub.forwarded_env(env)
    assert out["HF_TOKEN"] == "hf_secret" and out["HF_HUB_OFFLINE"] == "1" and "PATH" not in out
    assert out["QFARM_HUB_CACHE"].startswith("/") and out["QFARM_HUB_CACHE"].endswith("/hf")
    assert hub.forwarded_env({}, token="hf_saved") == {"HF_TOKEN": "hf_saved"}  # `hf auth login`'s token
    assert hub.forwarded_env(env, token="hf_saved")["HF_TOKEN"] == "hf_secret"  # the environment's wins
    assert str(hub.cache_dir("/out", {})) == "/out/_hub"
    assert str(hub.cache_dir("/out", {"QFARM_HUB_CACHE": "/shared/hf"})) == "/shared/hf"


def test_an_unreachable_hub_is_known_at_once_not_after_retries(tmp_path, monkeypatch):
    """No network and no HF_HUB_OFFLINE: pinning reads the cache's ref, validation reads no config, and neither
    waits for huggingface_hub's ~23 s of retries (a closed local port stands for the unreachable hub)."""
    import huggingface_hub

    def no_call(*a, **k):
        raise AssertionError("huggingface_hub was asked although the hub is out of reach")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_call)
    monkeypatch.setattr(huggingface_hub.HfApi, "resolve_revision", no_call)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hub.reachable()
    cached_repo(tmp_path, refs={"main": SHA_B})
    assert hub.resolve("acme/tiny", "main", tmp_path) == SHA_B
    with pytest.raises(hub.HubError, match="out of reach and the cache has no"):
        hub.resolve("acme/other", "main", tmp_path)
    assert hub.config_folder(tmp_path, "acme/other", SHA_A) is None
