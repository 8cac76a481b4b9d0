"""Running the `qfarm` CLI the way a user does (a subprocess), for the integration, e2e and GPU tiers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def qfarm(env, *args, timeout=1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qfarm.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def submitted_id(stdout: str) -> str:
    return re.search(r"submitted (\S+):", stdout).group(1)


def results(env, *sweeps) -> list[dict]:
    """The sweeps' rows (`qfarm results --format json`), each key checked to be a declared column or option."""
    out = qfarm(env, "results", *sweeps, "--format", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    undeclared = {k for r in data for k in r if not task_column(r, k)} - declared_keys()
    assert not undeclared, f"result keys that are neither a column of qfarm/results/columns.py nor an option: {undeclared}"
    return data


def task_column(row: dict, key: str) -> bool:
    """Whether ``key`` is a column of one of the row's lm-eval tasks (``<task>_<metric>``, named after the task)."""
    from qfarm.results.columns import column_name

    return any(key.startswith(column_name(t) + "_") for t in row.get("tasks") or {})


def declared_keys() -> set[str]:
    """Every column of the table, and every option of every kind and method of the registry."""
    from qfarm.results.columns import BY_NAME
    from qfarm.sweep.methods import KINDS

    models = [m for k in KINDS.values() for m in ([k.options] if k.options else [x.options for x in k.methods.values()])]
    return set(BY_NAME) | {f for m in models for f in m.model_fields}


def redis_dump(store) -> str:
    """Every value under the test's namespace, as text."""
    out = []
    for key in store.r.scan_iter(match=store.keys.pattern()):
        kind = store.r.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        value = {"string": store.r.get, "hash": store.r.hgetall, "list": lambda k: store.r.lrange(k, 0, -1),
                 "set": store.r.smembers, "zset": lambda k: store.r.zrange(k, 0, -1),
                 "stream": lambda k: store.r.xrange(k)}[kind](key)
        out.append(f"{key} {value}")
    return "\n".join(out)


def files_containing(text: str, folder: Path) -> list[str]:
    """The files below ``folder`` (a Ray session's logs, say) in which ``text`` appears: a secret must be in none."""
    needle = text.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def run_sweep(env, spec, name, key="method") -> dict:
    """Submit ``spec``, wait, and return its rows by ``key``."""
    run = qfarm(env, "submit", str(spec), "--wait", timeout=1800)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return {r[key]: r for r in results(env, name)}


def wandb_runs(folder: Path) -> dict[str, dict]:
    """The offline W&B runs under ``folder`` read back from their own files (``run-*.wandb``: W&B's record log,
    LevelDB's format of 32 KiB blocks, each record a protobuf ``Record``), by job id: name, group, job type, tags,
    config, summary, history rows and exit code."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    def records(raw: bytes):
        pos, buf = 7, b""  # after the file header (":W&B", magic, version)
        while pos + 7 <= len(raw):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
            data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
            if kind == 0:
                break
            buf = data if kind in (1, 2) else buf + data
            if kind in (1, 4):
                yield buf

    def key(item) -> str:
        return item.key or ".".join(item.nested_key)

    out = {}
    for path in Path(folder).rglob("run-*.wandb"):
        run = {"summary": {}, "history": [], "config": {}}
        for data in records(path.read_bytes()):
            rec = pb.Record()
            rec.ParseFromString(data)
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run.update(name=rec.run.display_name, group=rec.run.run_group, job_type=rec.run.job_type,
                           tags=list(rec.run.tags), project=rec.run.project, notes=rec.run.notes)
                run["config"].update({key(i): json.loads(i.value_json) for i in rec.run.config.update})
            elif kind == "summary":
                run["summary"].update({key(i): json.loads(i.value_json) for i in rec.summary.update})
            elif kind == "history":
                run["history"].append({key(i): json.loads(i.value_json) for i in rec.history.item})
            elif kind == "exit":
                run["exit_code"] = rec.exit.exit_code
        out[run["config"]["job_id"]] = run
    return out


def lay_out_hub_cache(folder: Path, cache: Path, repo: str) -> str:
    """``folder``'s files as huggingface_hub's cache holds a download of ``repo``: blobs/<sha256> (hard links, no
    copy), snapshots/<commit>/<name> -> ../../blobs/<sha256>, refs/main = <commit>. Returns the commit."""
    import hashlib
    import os

    root = cache / f"models--{repo.replace('/', '--')}"
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("QFARM_"))
    commit = hashlib.sha1("".join(f.name for f in files).encode()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if not (root / "blobs" / digest).exists():
            os.link(f, root / "blobs" / digest)
        (root / "snapshots" / commit / f.name).symlink_to(f"../../blobs/{digest}")
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return commit


