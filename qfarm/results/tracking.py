"""Results into MLflow, where many users already keep their experiments.

One MLflow experiment per sweep (named after the sweep id unless told otherwise; its description holds the spec),
one run per job: its options as params (nested ones dotted: ``calibration.samples``), every numeric column of its
row as metrics, the training loss curve as the history of ``train_loss_curve``, the job's place in a pipeline as
parent/child runs (``mlflow.parentRunId``: a merge is the child of its train job's run), the artifact's path as the
tag ``qfarm.artifact`` (its files are copied only when asked). Sending a sweep again updates its runs instead of
adding more: a run is found by its ``qfarm.job_id`` tag; a job that ran again (another finish time) gets a new run,
the old one is deleted.

``qfarm results SWEEP --to mlflow`` sends a finished sweep; a spec's ``tracking: {mlflow: ...}`` block makes its
scheduler send each job as it finishes. MLflow is imported here only (``pip install 'qfarm[mlflow]'``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import urlsplit

from qfarm.errors import QfarmError
from qfarm.sweep.job import Job

SKIPPED_METRICS = frozenset({"started_at", "finished_at", "queued_at", "created_at"})  # the run's own times
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "skipped": "KILLED"}
SPEC_SCHEMES = ("http", "https", "databricks", "sqlite", "file", "")  # file: is refused with its own reason


def spec_uri_problem(uri: str) -> str | None:
    """Why a spec's ``tracking_uri`` is refused (None: fine). A spec names a server, or a store under the output
    root by a relative path: never an absolute path or one that climbs out."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter is a path
        scheme = ""
    if scheme not in SPEC_SCHEMES:
        return f"scheme {scheme!r} is not allowed: http(s)://HOST, databricks, or a relative sqlite:///FILE.db or folder"
    if scheme in ("http", "https", "databricks"):
        return None
    if scheme == "file":
        return "a file: URI is an absolute path; in a spec give a folder relative to the output root (e.g. mlruns)"
    path = uri.split(":///", 1)[1] if scheme == "sqlite" and ":///" in uri else (parts.path if scheme else uri)
    if not path or path.startswith(("/", "~", "\\")) or ".." in PurePosixPath(path.replace("\\", "/")).parts:
        return ("a local store in a spec is a path relative to the output root (e.g. sqlite:///mlflow.db or mlruns), "
                "without '..': absolute paths are given on the command line, not in a spec")
    return None


CLI_SCHEMES = ("", "file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql")


def cli_uri_problem(uri: str) -> str | None:
    """Why ``--tracking-uri`` cannot name an MLflow store (None: it can): the schemes MLflow 3 stores runs in."""
    scheme = urlsplit(uri).scheme.lower()
    if len(scheme) == 1 or scheme in CLI_SCHEMES:  # a Windows drive letter is a path
        return None
    return (f"scheme {scheme!r} is not one MLflow stores runs in: a folder, sqlite:///FILE.db, http(s)://HOST, "
            "databricks, or a database URL (postgresql://, mysql://, mssql://)")


def resolve_uri(uri: str | None, output_root: str, env=None) -> str:
    """The tracking URI to use: ``uri`` (a relative local store resolved under the output root), else the
    environment's MLFLOW_TRACKING_URI, else a SQLite store at ``<output root>/mlflow.db``."""
    env = os.environ if env is None else env
    uri = uri or env.get("MLFLOW_TRACKING_URI")
    root = Path(output_root).expanduser().resolve()
    if not uri:
        return f"sqlite:///{root / 'mlflow.db'}"
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "sqlite" and ":///" in uri:
        path = uri.split(":///", 1)[1]
        return uri if path.startswith("/") else f"sqlite:///{root / path}"
    if scheme in ("", "file") and len(scheme) != 1:
        path = uri.split("://", 1)[1] if scheme == "file" else uri
        p = Path(path).expanduser()
        return (p if p.is_absolute() else root / p).resolve().as_uri()
    return uri


def shown(uri: str) -> str:
    """A tracking URI fit for a message, Redis or a log: a server's user-info and secret-looking query values as ***."""
    if urlsplit(uri).scheme.lower() not in ("http", "https"):
        return uri
    from qfarm.farm.connection import _redact

    return _redact(uri)


def _mlflow():
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise QfarmError("sending results to MLflow needs mlflow: pip install 'qfarm[mlflow]' "
                         "(or pip install mlflow)") from None
    return MlflowClient


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is not None:
        text = value if isinstance(value, str) else json.dumps(value)
        out[prefix] = text[:6000]


def params_of(row: dict, options: dict) -> dict[str, str]:
    """A job's options (and its kind, method, bits, model), flat and as text: MLflow params."""
    out: dict[str, str] = {}
    _flat("", {k: v for k, v in options.items()}, out)
    for k in ("kind", "method", "bits", "label", "stage"):
        if row.get(k) is not None:
            out.setdefault(k, str(row[k]))
    return out


def metrics_of(row: dict) -> dict[str, float]:
    """Every finite numeric value of the row (booleans as 0/1), except the run's own timestamps. An evaluation
    domain's figures (``kl@wiki``) as ``kl/wiki``: MLflow's names allow no ``@``, and W&B groups them by domain."""
    out = {}
    for key, v in row.items():
        if key in SKIPPED_METRICS or v is None or isinstance(v, (str, list, dict)):
            continue
        k = key.replace("@", "/")
        if isinstance(v, bool):
            out[k] = 1.0 if v else 0.0
        elif isinstance(v, (int, float)) and math.isfinite(v):
            out[k] = float(v)
    return out


def tags_of(row: dict, sweep_id: str) -> dict[str, str]:
    tags = {"qfarm.job_id": row["job_id"], "qfarm.sweep_id": sweep_id, "qfarm.status": row.get("status") or "",
            "qfarm.finished_at": repr(row.get("finished_at")), "mlflow.runName": str(row.get("label") or row["job_id"])}
    for k in ("kind", "method", "artifact", "model_card", "device", "runtime", "lineage", "error", "model_revision",
              "stage"):
        if row.get(k):
            tags[f"qfarm.{k}"] = str(row[k])[:5000]
    for pkg, version in (row.get("versions") or {}).items():
        tags[f"qfarm.version.{pkg}"] = str(version)
    if row.get("error"):
        tags["mlflow.note.content"] = f"**{row.get('status')}**: {row['error']}"[:5000]
    return tags


def experiment_note(record) -> str:
    """The experiment's description in MLflow's UI: what the sweep is, and its spec."""
    import yaml

    raw = (record.info or {}).get("raw_spec")
    spec = yaml.safe_dump(raw, sort_keys=False) if raw else "(not recorded)"
    return (f"qfarm sweep **{record.id}** ({record.name}), from `{record.source}`; artifacts under "
            f"`{record.output_root}`.\n\n```yaml\n{spec[:20000]}```\n")


class Sender:
    """Sends rows of one sweep to one tracking store; finds and updates the runs it sent before."""

    def __init__(self, tracking_uri: str, record, experiment: str | None = None, copy_artifacts: bool = False,
                 say: Callable[[str], None] = lambda line: None):
        client_cls = _mlflow()
        import logging

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines on creating a store's tables
        self.uri, self.record, self.copy, self.say = tracking_uri, record, copy_artifacts, say
        if urlsplit(tracking_uri).scheme.lower() == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE") is None:
            # MLflow 3 refuses its folder store (maintenance mode upstream) unless asked: the user asked for a folder
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
            say("MLflow's folder store is in maintenance mode upstream: qfarm opted in (MLFLOW_ALLOW_FILE_STORE=true); "
                "sqlite:///FILE.db is the local store MLflow supports")
        self.client = client_cls(tracking_uri=tracking_uri)
        name = experiment or record.id
        found = self.client.get_experiment_by_name(name)
        if found is not None and found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        if found is None:
            location = None
            if tracking_uri.startswith("sqlite:///"):  # its artifacts beside the database, not in the cwd
                location = (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
            self.experiment_id = self.client.create_experiment(name, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id
        self.experiment = name
        self.client.set_experiment_tag(self.experiment_id, "mlflow.note.content", experiment_note(record))
        self.client.set_experiment_tag(self.experiment_id, "qfarm.sweep_id", record.id)
        # MLflow's UI then opens it on its runs table (model training), not on the GenAI traces view
        self.client.set_experiment_tag(self.experiment_id, "mlflow.experimentKind", "custom_model_development")
        self.runs: dict[str, Any] = {}
        for run in self._search(f"tags.`qfarm.sweep_id` = '{record.id}'"):
            self.runs.setdefault(run.data.tags.get("qfarm.job_id"), run)

    def _search(self, query: str) -> list:
        out, token = [], None
        while True:
            page = self.client.search_runs([self.experiment_id], query, max_results=1000, page_token=token)
            out += list(page)
            token = page.token
            if not token:
                return out

    def send(self, rows: list[dict], jobs_by_id: dict[str, Job]) -> dict[str, int]:
        """Each row as a run (parents first, so a child can name its parent's run). Counts what was done."""
        done = {"created": 0, "updated": 0, "unchanged": 0}
        order = sorted(rows, key=lambda r: len(_job_of(jobs_by_id, r).lineage))
        for row in order:
            job = _job_of(jobs_by_id, row)
            parent_run = self.runs.get(job.parent)
            done[self._one(row, job, parent_run.info.run_id if parent_run else None)] += 1
        return done

    def _one(self, row: dict, job: Job, parent_run_id: str | None) -> str:
        from mlflow.entities import Metric, Param, RunTag

        metrics = metrics_of(row)
        old = self.runs.get(row["job_id"])
        finished = repr(row.get("finished_at"))
        if old is not None and old.data.tags.get("qfarm.finished_at") == finished:
            changed = {k: v for k, v in metrics.items() if old.data.metrics.get(k) != v}  # e.g. the frontier moved
            tags = {k: v for k, v in tags_of(row, self.record.id).items() if old.data.tags.get(k) != v}
            if not changed and not tags:
                return "unchanged"
            self._batch(old.info.run_id, metrics=[Metric(k, v, _ms(row.get("finished_at")), 0) for k, v in changed.items()],
                        tags=[RunTag(k, v) for k, v in tags.items()])
            return "updated"
        if old is not None:  # the job ran again: its old run goes
            self.client.delete_run(old.info.run_id)
        tags = tags_of(row, self.record.id)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, start_time=_ms(row.get("started_at") or row.get("queued_at")),
                                     tags=tags, run_name=tags["mlflow.runName"])
        run_id = run.info.run_id
        at = _ms(row.get("finished_at"))
        self._batch(run_id, metrics=[Metric(k, v, at, 0) for k, v in metrics.items()],
                    params=[Param(k, v) for k, v in params_of(row, job.options).items()])
        curve = loss_points(row.get("loss_curve"))
        if curve:
            self._batch(run_id, metrics=[Metric("train_loss_curve", loss, at, step) for step, loss in curve])
        if self.copy and row.get("artifact") and Path(row["artifact"]).is_dir():
            self.say(f"copying {row['artifact']} into run {run_id}")
            self.client.log_artifacts(run_id, row["artifact"], artifact_path="artifact")
        status = STATUS.get(row.get("status") or "", "RUNNING")
        if status != "RUNNING":
            self.client.set_terminated(run_id, status=status, end_time=at)
        self.runs[row["job_id"]] = self.client.get_run(run_id)
        return "created"

    def _batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        metrics, params, tags = list(metrics), list(params), list(tags)
        while metrics or params or tags:  # MLflow takes at most 1000 metrics, 100 params, 100 tags a call
            self.client.log_batch(run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100])
            metrics, params, tags = metrics[1000:], params[100:], tags[100:]


def loss_points(curve) -> list[tuple[int, float]]:
    """A training row's ``loss_curve`` ([[step, loss], ...]) as (step, loss) pairs; anything else is skipped."""
    out = []
    for point in curve or []:
        if (isinstance(point, (list, tuple)) and len(point) == 2 and isinstance(point[0], (int, float))
                and isinstance(point[1], (int, float)) and math.isfinite(point[1])):
            out.append((int(point[0]), float(point[1])))
    return out


def _ms(ts) -> int | None:
    return int(ts * 1000) if isinstance(ts, (int, float)) else None


def web_address(uri: str, experiment_id: str) -> str:
    """How a person opens the experiment: its page on a tracking server, or the command that serves a local store."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"  # its runs table, not GenAI's view
    if urlsplit(uri).scheme in ("http", "https"):
        return f"{uri.rstrip('/')}/{page}"
    return f"mlflow ui --backend-store-uri {uri}  then http://127.0.0.1:5000/{page}"


# MLflow's own settings that a tracking server's login needs: they reach the scheduler from the submitting shell
# through Ray's object store (qfarm.farm.handoff), like HF_TOKEN, never Redis or a log; its workers do not get them.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                 "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_CLIENT_CERT_PATH",
                 "DATABRICKS_HOST", "DATABRICKS_TOKEN", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")
TRACK_S = 2.0


def forwarded_env(env=None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {k: env[k] for k in FORWARDED_ENV if env.get(k)}


class LiveTracker:
    """A spec's ``tracking: {mlflow: ...}`` in the scheduler: a thread that sends each job to MLflow once it has
    finished (read from the scheduler's view of its jobs, so dispatch never waits on the tracking server), and
    the whole sweep once more at the end (the frontier marks move as rows arrive). A tracking failure is said in
    the sweep record and the events stream; it never fails a job or the sweep."""

    def __init__(self, settings: dict, store, sweep_id: str, output_root: str, env: dict[str, str], jobs: Callable):
        import threading

        self.settings, self.store, self.sweep_id, self.jobs = settings, store, sweep_id, jobs
        os.environ.update({k: v for k, v in env.items() if k in FORWARDED_ENV})
        # a tracking server that is away costs seconds, not MLflow's default minutes of retries, per pass
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.uri = resolve_uri(settings.get("tracking_uri"), output_root)
        self.sent: dict[str, float | None] = {}
        self.sender: Sender | None = None
        self._said = ""
        self._lock = threading.Lock()  # the thread's pass and close()'s last one never overlap
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="qfarm-tracking", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(TRACK_S):
            self.send()

    def send(self, final: bool = False) -> None:
        with self._lock:
            self._send(final)

    def _send(self, final: bool) -> None:
        from qfarm.results.compare import compare_noted
        from qfarm.results.rows import rows

        try:
            jobs = list(self.jobs())
            fresh = {j.id for j in jobs if j.status in ("succeeded", "failed", "cancelled", "skipped")
                     and self.sent.get(j.id, -1) != j.finished_at}
            if not fresh and not final:
                return
            if self.sender is None:
                record = self.store.sweep(self.sweep_id)
                self.sender = Sender(self.uri, record, self.settings.get("experiment"),
                                     bool(self.settings.get("copy_artifacts")))
            data, _, _ = compare_noted([dict(r, sweep_id=self.sweep_id) for r in rows(jobs)])
            chosen = [r for r in data if r["job_id"] in fresh or (final and r["status"] not in ("queued", "running"))]
            self.sender.send(chosen, {j.id: j.job for j in jobs})
            for j in jobs:
                if j.id in fresh:
                    self.sent[j.id] = j.finished_at
            self._say(f"sent {len(self.sent)} job(s) to MLflow at {shown(self.uri)}, experiment "
                      f"{self.sender.experiment!r}: {web_address(shown(self.uri), self.sender.experiment_id)}")
        except Exception as e:  # noqa: BLE001 - see the class docstring
            from qfarm.errors import one_line

            self._say(f"MLflow tracking failed: {one_line(e)}".replace(self.uri, shown(self.uri)), failed=True)

    def _say(self, text: str, failed: bool = False) -> None:
        if text == self._said:
            return
        self._said = text
        self.store.set_tracking_note(self.sweep_id, text)
        if failed:
            self.store.scheduler_event(self.sweep_id, "tracking_failed", reason=text[:500])

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the thread; the last pass sends every finished job with the final frontier."""
        self._stop.set()
        self._thread.join(timeout_s)
        self.send(final=True)


def to_wandb(record, rows: list[dict], jobs_by_id: dict[str, Job], project: str | None, directory: str,
             say: Callable[[str], None] = lambda line: None) -> list[str]:
    """Each row as a Weights & Biases run: offline (its files under ``directory``, for ``wandb sync``) unless the
    environment sets WANDB_MODE=online with a login. The sweep is the runs' group, the kind their job type, the
    options their config (with the parent job, W&B having no parent runs), every numeric column their summary,
    a training job's loss curve their history. Returns the run folders written."""
    try:
        import wandb
    except ImportError:
        raise QfarmError("sending results to W&B needs wandb: pip install 'qfarm[wandb]' (or pip install wandb)") from None
    mode = "online" if os.environ.get("WANDB_MODE") == "online" else "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(directory).mkdir(parents=True, exist_ok=True)
    folders = []
    for row in rows:
        config = params_of(row, _job_of(jobs_by_id, row).options)
        config.update({"job_id": row["job_id"], "sweep_id": record.id, "parent_job": row.get("parent") or "",
                       "artifact": row.get("artifact") or ""})
        run = wandb.init(mode=mode, dir=directory, project=project or "qfarm", group=record.id,
                         job_type=str(row.get("kind") or "job"), name=str(row.get("label") or row["job_id"]),
                         id=f"{record.id}-{row['job_id']}", config=config, notes=row.get("error") or None,
                         tags=[t for t in ("qfarm", row.get("kind"), row.get("method"), row.get("status")) if t],
                         reinit="create_new", settings=wandb.Settings(console="off", save_code=False,
                                                                        x_disable_stats=True))
        for step, loss in loss_points(row.get("loss_curve")):
            run.log({"train_loss_curve": loss}, step=step)
        run.summary.update(metrics_of(row))
        folders.append(str(Path(run.dir).parent))
        run.finish(exit_code=0 if row.get("status") == "succeeded" else 1)
    say(f"wrote {len(folders)} W&B run(s) ({mode}) under {directory}"
        + (f": upload them with `wandb sync {directory}/wandb/offline-run-*`" if mode == "offline" else ""))
    return folders


def _job_of(jobs_by_id: dict[str, Job], row: dict) -> Job:
    """A row's job (its options, parent, lineage); a row without one (a job deleted since) reads as none."""
    return jobs_by_id.get(row["job_id"]) or Job.from_record(row["job_id"], {})
