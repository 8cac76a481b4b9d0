"""The ``qfarm`` command line. Light on purpose: Ray is imported only by the verbs that need it, torch never.

Exit codes: 0 fine; 1 a failure (unreachable service, a job that failed); 2 bad input (spec, arguments,
resources no node has).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

import click

from qfarm import settings
from qfarm.errors import QfarmError, SpecError, UsageError, missing_extra, one_line
from qfarm.farm.keys import DEFAULT_CANCEL_GRACE_S
from qfarm.farm.keys import DEFAULT_OUTPUT_ROOT as OUTPUT_ROOT_DEFAULT


def _err(text: str) -> None:
    click.echo(text, err=True)


def handle_errors(fn):
    """Print user errors without a traceback and exit with their code; hide internal tracebacks too."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QfarmError as e:
            _err(str(e) if isinstance(e, SpecError) else f"error: {e}")
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            _err("interrupted (a submitted sweep keeps running; `qfarm status` shows it)")
            sys.exit(130)
        except click.exceptions.Exit:
            raise
        except Exception as e:  # a bug of ours: say so in one line; QFARM_DEBUG=1 shows the traceback
            if settings.get("QFARM_DEBUG"):
                raise
            if missing_extra(e):  # an optional library this command needs (`make demo` installs one extra)
                _err(f"error: {missing_extra(e, here=True)}")
                sys.exit(1)
            if isinstance(e, OSError) and e.filename:  # a path the user gave: one to write that cannot be, ...
                _err(f"error: {e.strerror or type(e).__name__}: {e.filename}")
                sys.exit(2)
            _err(f"internal error: {type(e).__name__}: {e} (set QFARM_DEBUG=1 for the traceback)")
            sys.exit(1)

    return wrapper


def _store(ctx: click.Context):
    from qfarm.farm.connection import connect_redis
    from qfarm.farm.store import Store

    obj = ctx.obj
    if "store" not in obj:
        client, url = connect_redis(obj["redis_url"], say=click.echo)
        store = Store(client, obj["namespace"])
        store.check_access(url)
        obj["store"], obj["redis_url_resolved"] = store, url
    return obj["store"]


def _complete_sweeps(ctx: click.Context, param, incomplete: str) -> list:
    """Shell completion of a SWEEP argument: the sweep ids and names in Redis (nothing when it does not answer)."""
    from click.shell_completion import CompletionItem

    try:
        from qfarm.farm.connection import quick_sweep_ids

        root = ctx.find_root().params
        found = quick_sweep_ids(root.get("redis_url"), root.get("namespace") or "qfarm")
    except Exception:  # noqa: BLE001 - completion must never print a traceback into the shell
        return []
    return [CompletionItem(s) for s in found if s.startswith(incomplete)]


MAX_JOBS = 10_000  # qfarm.sweep.validate's default, not imported here: `qfarm --help` loads no spec machinery


def _max_jobs_option(f):
    return click.option("--max-jobs", type=click.IntRange(1, 10_000_000), default=MAX_JOBS, show_default=True,
                        metavar="N", help="Refuse a sweep that could make more jobs than this (counted from its "
                                          "matrices before anything is expanded).")(f)


def _cluster_config_option(f):
    return click.option("--cluster-config", envvar="QFARM_CLUSTER_CONFIG", default=None, metavar="FILE",
                        help="The cluster's `ray up` config: its node types count as capacity the autoscaler may "
                             "start [env QFARM_CLUSTER_CONFIG; default ~/ray_bootstrap_config.yaml when it "
                             "exists, as on a `ray up` head].")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--redis-url", envvar="QFARM_REDIS_URL", default=None, metavar="URL",
              help="Redis holding all state [env QFARM_REDIS_URL; default redis://127.0.0.1:6379/0, "
                   "or a private redis-server qfarm starts when nothing answers there].")
@click.option("--namespace", envvar="QFARM_NAMESPACE", default="qfarm", show_default=True,
              help="Key prefix in Redis, so several teams can share one server [env QFARM_NAMESPACE].")
@click.version_option(package_name="qfarm")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None, namespace: str) -> None:
    """qfarm: sweeps of LLM quantization jobs on a Ray cluster, with every job's state in Redis.

    \b
      qfarm validate jobs/demo.yaml
      qfarm submit jobs/demo.yaml --wait
      qfarm status [SWEEP] [--watch] [--json]
      qfarm results SWEEP --format table|md|csv|json
      qfarm results SWEEP --to mlflow|wandb
      qfarm cancel SWEEP
    """
    ctx.ensure_object(dict)
    ctx.obj.update(redis_url=redis_url, namespace=namespace)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--jobs", "show_jobs", is_flag=True, help="List every job the sweep expands to.")
@click.option("--plan", "show_plan", is_flag=True,
              help="Each job's memory plan from the model's config (GPU GB per device, host GB, disk GB).")
@click.option("--plan-device", type=click.Choice(["cuda", "cpu"]), default="cuda", show_default=True,
              help="What the plan is for: GPU workers (the checkpoint's dtype) or CPU workers (float32, all in "
                   "host RAM); with --plan the sweep's ids are those jobs on such workers get.")
@click.option("--json", "as_json", is_flag=True, help="With --plan: a JSON list, one object per job, alone on stdout.")
@click.option("--ray-address", envvar="QFARM_RAY_ADDRESS", default=None, metavar="ADDR",
              help="Also check every job's resources against this Ray cluster [env QFARM_RAY_ADDRESS]. "
                   "Default: qfarm's local Ray head when it is running.")
@click.option("--offline", is_flag=True, help="Check the file only, not against any running cluster.")
@_cluster_config_option
@_max_jobs_option
@handle_errors
def validate(spec: Path, show_jobs: bool, show_plan: bool, plan_device: str, as_json: bool, ray_address: str | None,
             offline: bool, cluster_config: str | None, max_jobs: int) -> None:
    """Check a sweep file: every error at once, with its YAML path and line; and, given a cluster (running, or the
    node types of its config), whether some node of it can run each job (exit 2 naming what it has, when not).
    Runs nothing."""
    from qfarm.farm import cluster
    from qfarm.sweep import hub
    from qfarm.sweep.expand import build, load_valid
    from qfarm.sweep.spec import domain_name

    valid = load_valid(spec, hub.cache_dir(None), max_jobs)
    loaded = valid.loaded
    types = [t.as_dict() for t in cluster.read_node_types(cluster_config)]
    address = None if offline else (ray_address or (cluster.local_head_state() or {}).get("address"))
    named = f" and {len(types)} node type(s) its autoscaler may start" if types else ""
    shape = _shape(valid)
    if address:
        cluster.connect(address)
    # the ids submit will give: CPU ids where the jobs would compute on CPUs (qfarm.sweep.expand.COMPUTE)
    # (with --plan: the ids of the workers planned for)
    cuda = plan_device == "cuda" if show_plan else cluster.has_cuda(cluster.cluster_nodes(types)) if address else \
        cluster.has_cuda(cluster.startable_nodes(types)) if types else cluster.cuda_gpu_count() > 0
    expanded = build(valid, cuda, max_jobs)
    kinds = ", ".join(f"{n} {k}" for k, n in expanded.counts_by_kind().items())
    labels = sorted({j.label for j in expanded.jobs if j.kind != "sleep"})
    what = f" ({', '.join(labels)})" if labels else ""
    model = f" on {loaded.spec.model}" if loaded.spec.model else ""
    if address:
        cluster.preflight([j.payload() for j in expanded.jobs], types, shape)
        checked = f" Resources checked against the Ray cluster at {address}{named}."
    elif types:
        cluster.refuse_unplaceable([j.payload() for j in expanded.jobs], cluster.startable_nodes(types), shape)
        checked = f" Resources checked against the {len(types)} node type(s) of the cluster config."
    else:
        checked = " Resources not checked against a cluster (give --ray-address, or start one: qfarm submit)."
    made = (f" {len(expanded.implicit)} of them the reference (method none, added: the spec has none; every row is "
            "measured against it, and only it loads the float model)." if expanded.implicit else "")
    ppl = loaded.spec.eval.perplexity
    domains = (f" Evaluated on {len(ppl)} domains: {', '.join(domain_name(d) for d in ppl)} (the plain columns and the "
               f"default frontier are {domain_name(ppl[0])}'s)." if isinstance(ppl, list) else "")
    click.echo(f"{spec}: valid. Sweep {expanded.sweep_id}: {len(expanded.jobs)} jobs: {kinds}{what}{model}.{made}{domains}"
               f"{checked}", err=as_json)
    if valid.search is not None:
        for line in valid.search.summary(loaded.spec.search):
            click.echo(line, err=as_json)
    if show_plan:
        _print_plan(loaded, expanded, shape, plan_device, as_json, types)
    if show_jobs:
        for job in expanded.jobs:
            opts = ", ".join(f"{k}={v}" for k, v in job.options.items())
            click.echo(f"  {job.id}  {job.kind:<8} {opts}")


def _ray_options(f):
    f = click.option("--logical-gpus", type=click.IntRange(0, 64), envvar="QFARM_LOGICAL_GPUS", default=None,
                     help="GPU slots the local head declares when the machine has no GPU (default 2).")(f)
    return click.option("--ray-address", envvar="QFARM_RAY_ADDRESS", default=None, metavar="ADDR",
                        help="An existing Ray cluster (host:port, ray://host:10001, auto, or its dashboard http://host:8265: "
                             "the scheduler then starts as a Ray Job, no driver here) [env QFARM_RAY_ADDRESS]. "
                             "Default: qfarm's own local Ray head, started on first use.")(f)


def _shape(sweep):
    """The model's shape for the memory plan (its config or GGUF header), or None where it cannot be read here."""
    from qfarm.sweep.plan import model_shape

    return model_shape(sweep.model) if sweep.model else None


def _print_plan(loaded, expanded, shape, device: str, as_json: bool, node_types: list[dict]) -> None:
    """``qfarm validate --plan``: every job's memory plan (qfarm.sweep.plan), as a table or a JSON list."""
    import json

    from qfarm.sweep.plan import UNSPREAD, plan_jobs

    model = expanded.model  # resolved once, by validation
    if shape is None:
        raise UsageError(f"no memory plan: the config of {loaded.spec.model} cannot be read here (a hub model "
                         "needs its config.json in the hub cache, or the hub in reach)")
    rows = plan_jobs([j.payload() for j in expanded.jobs], shape, device)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    source = "a GGUF file" if model.get("kind") == "gguf" else shape.dtype
    from qfarm.results.fit import Col, fit, show, terminal_width

    click.echo(f"memory plan on {device} workers ({shape.total / 1e9:.2f}B parameters, checkpoint {source}; "
               "GB = 1e9 bytes):")
    cols = [Col("label", "job", 0), Col("gpu", "GPU GB/device", 1, "right"), Col("host", "host GB", 2, "right"),
            Col("gpus", "gpus", 3, "right"), Col("disk", "disk GB", 4, "right"), Col("job_id", "id", 5)]
    cells = [{"label": r["label"], "gpu": f"{r['gpu_gb_per_device']:.1f}", "host": f"{r['host_gb']:.1f}",
              "gpus": str(r["gpus"]), "disk": f"{r['disk_gb']:.1f}", "job_id": r["job_id"]} for r in rows]
    width = terminal_width(False)
    table, _ = fit(cols, cells, width)
    show(table, width)
    worst = max(rows, key=lambda r: r["gpu_gb_per_device"] if device == "cuda" else r["host_gb"])
    n = worst["gpus"] if device == "cuda" else 1
    terms = worst["parts"]["gpu" if device == "cuda" else "host"].items()
    parts = ", ".join(f"{k} {v:.1f}" if n <= 1 or k in UNSPREAD else f"{k} {v:.1f} ({v / n:.1f} a GPU)" for k, v in terms)
    phase = f" ({worst['peak_phase']} phase)" if device == "cuda" else ""
    line = f"  largest: {worst['label']}{phase}: {parts}"
    if width:
        import textwrap

        line = textwrap.fill(line, width, subsequent_indent="    ")
    click.echo(line)
    offered = sorted({f"{t['name']}: {t['labels'].get('qfarm-gpu-mem-gb')} GB per GPU" for t in node_types
                      if t.get("labels", {}).get("qfarm-gpu-mem-gb")})
    if offered:
        click.echo(f"  the cluster's node types offer: {'; '.join(offered)}")


def _wide_option(f):
    return click.option("--wide", is_flag=True,
                        help="Every column, however wide the terminal (a narrow one otherwise gets the columns "
                             "that fit, by priority; a file or a pipe always gets all).")(f)


def _output_root_option(f):
    return click.option("--output-root", envvar="QFARM_OUTPUT_ROOT", default=OUTPUT_ROOT_DEFAULT, show_default=True,
                        type=click.Path(file_okay=False, path_type=Path),
                        help="Where artifacts go: <root>/<sweep>/<job>. Must be reachable by every node "
                             "[env QFARM_OUTPUT_ROOT].")(f)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Show live progress, then print the comparison table.")
@_ray_options
@_output_root_option
@_cluster_config_option
@_max_jobs_option
@click.pass_context
@handle_errors
def submit(ctx: click.Context, spec: Path, wait: bool, ray_address: str | None, logical_gpus: int | None,
           output_root: Path, cluster_config: str | None, max_jobs: int) -> None:
    """Submit a sweep. Finished jobs of an identical earlier submit are reused, failed ones rerun."""
    from qfarm.farm import cluster
    from qfarm.farm import ray_jobs as jobs
    from qfarm.sweep import hub
    from qfarm.sweep.expand import build, load_valid

    valid = load_valid(spec, hub.cache_dir(output_root), max_jobs)
    loaded = valid.loaded
    store = _store(ctx)
    types = [t.as_dict() for t in cluster.read_node_types(cluster_config)]
    shape = _shape(valid)
    if jobs.is_jobs_address(ray_address):  # outside the cluster: its dashboard's API, no Ray driver here
        nodes = jobs.nodes(ray_address) + cluster.startable_nodes(types)
    else:
        cluster.connect(ray_address, logical_gpus, say=click.echo)
        nodes = cluster.cluster_nodes(types)
    # built once, for the device class found: on logical GPU slots the jobs compute on CPUs, and their ids say so
    expanded = build(valid, cluster.has_cuda(nodes), max_jobs)
    payloads = [j.payload() for j in expanded.jobs]
    cluster.refuse_unplaceable(payloads, nodes, shape)
    root = str(output_root.expanduser().resolve())
    tracking = loaded.spec.tracking.model_dump(exclude_none=True) if loaded.spec.tracking else None
    if tracking and tracking.get("mlflow"):
        _need_mlflow(loaded)
    counts = store.submit(expanded.sweep_id, expanded.name, payloads, source=str(spec.resolve()), output_root=root,
                          info={"raw_spec": loaded.raw, "model": loaded.spec.model, "node_types": types,
                                "tracking": tracking})
    _launch(ctx, expanded.sweep_id, ray_address, root, loaded.spec.model)
    reused = counts.get("succeeded", 0)
    note = f" ({reused} reused from an earlier run)" if reused else ""
    click.echo(f"submitted {expanded.sweep_id}: {len(expanded.jobs)} jobs{note}; artifacts under {root}/{expanded.name}")
    _follow_or_hint(ctx, store, expanded.sweep_id, wait)


def _need_mlflow(loaded) -> None:
    """A spec that tracks in MLflow, where MLflow is not installed: said before anything is queued."""
    import importlib.util

    from qfarm.errors import Problem

    if importlib.util.find_spec("mlflow") is None:
        raise SpecError([Problem("tracking.mlflow", "MLflow is not installed here: pip install 'qfarm[mlflow]' (on "
                                 "the head node too: the sweep's scheduler sends the runs)",
                                 loaded.lines.get(("tracking", "mlflow")))], loaded.source)


def _tracking_done(store, sweep_id: str, wait_s: float = 120.0) -> None:
    """A sweep that tracks in MLflow: wait for its scheduler's last pass (the final frontier) and say what it sent."""
    import time

    record = store.sweep(sweep_id)
    if not ((record.info or {}).get("tracking") or {}).get("mlflow"):
        return
    deadline = time.time() + wait_s
    while record.finished_at is None and time.time() < deadline:
        time.sleep(0.5)
        record = store.sweep(sweep_id)
    if record.tracking_note:
        click.echo(f"MLflow: {record.tracking_note}", err=True)


def _scheduler_alive(store, sweep_id: str, namespace: str) -> bool:
    """Whether the sweep's scheduler lives: asked of Ray when this client is connected to it; else (a Ray Job
    started it, from outside the cluster) whether it has passed in its sweep record lately."""
    import time

    from qfarm.farm import scheduler, watchdog

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return scheduler.alive(sweep_id, namespace)
    record = store.sweep(sweep_id)
    last = record and (record.scheduler_beat_at or record.submitted_at)
    return bool(last) and time.time() - last < watchdog.stale_s()


def _follow_or_hint(ctx: click.Context, store, sweep_id: str, wait: bool) -> None:
    """Without --wait, say how to follow the sweep; with it, follow to the end, print the table, exit 1 if a
    job did not succeed."""
    if not wait:
        click.echo(f"follow it with: qfarm status {sweep_id}   results: qfarm results {sweep_id}")
        return
    from qfarm.results.progress import follow

    follow(store, sweep_id, alive=lambda: _scheduler_alive(store, sweep_id, ctx.obj["namespace"]))
    _tracking_done(store, sweep_id)
    data, _, note = _compared(store, [sweep_id], [], None, None)
    _print_results(data, sweep_id, "table")
    if note:
        click.echo(f"note: {note}", err=True)
    failed = [j for j in store.sweep_jobs(sweep_id) if j.status != "succeeded"]
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("sweep", shell_complete=_complete_sweeps)
@click.option("--failed", "failed_only", is_flag=True, help="Requeue failed (and skipped) jobs only, not cancelled ones.")
@click.option("--wait", is_flag=True, help="Show live progress, then print the comparison table.")
@_ray_options
@_output_root_option
@click.pass_context
@handle_errors
def retry(ctx: click.Context, sweep: str, failed_only: bool, wait: bool, ray_address: str | None,
          logical_gpus: int | None, output_root: Path) -> None:
    """Requeue a sweep's failed, skipped (and cancelled) jobs, attempts reset, and run them. Finished jobs stay, but
    a search's final jobs that ranked the candidates without one of them run again once it succeeds."""
    store = _store(ctx)
    record = _find(store, sweep)
    _same_root(record, output_root)  # before anything is requeued
    requeued = store.retry(record.id, cancelled=not failed_only)
    if not requeued:
        which = "failed or skipped" if failed_only else "failed, skipped or cancelled"
        click.echo(f"nothing to retry in {record.id}: no {which} jobs")
        return
    _start_scheduler(ctx, record, ray_address, logical_gpus, output_root)
    click.echo(f"requeued {len(requeued)} job(s) of {record.id}")
    _follow_or_hint(ctx, store, record.id, wait)


@cli.command()
@click.argument("sweep", shell_complete=_complete_sweeps)
@click.option("--wait", is_flag=True, help="Show live progress, then print the comparison table.")
@_ray_options
@_output_root_option
@click.pass_context
@handle_errors
def resume(ctx: click.Context, sweep: str, wait: bool, ray_address: str | None, logical_gpus: int | None,
           output_root: Path) -> None:
    """Start a sweep's scheduler again (after a cluster restart, or if it died): it rebuilds its view from
    Redis; jobs left running by dead workers are requeued when their heartbeat lapses."""
    store = _store(ctx)
    record = _find(store, sweep)
    _start_scheduler(ctx, record, ray_address, logical_gpus, output_root)
    click.echo(f"resumed {record.id}")
    _follow_or_hint(ctx, store, record.id, wait)


def _start_scheduler(ctx: click.Context, record, ray_address: str | None, logical_gpus: int | None,
                     output_root: Path) -> None:
    """Start a submitted sweep's scheduler again. Its output root is this command's (workers take no path from
    Redis), so it must be the one the sweep was submitted with: where its finished jobs' artifacts are."""
    from qfarm.farm import cluster
    from qfarm.farm import ray_jobs as jobs

    root = _same_root(record, output_root)
    if not jobs.is_jobs_address(ray_address):
        cluster.connect(ray_address, logical_gpus, say=click.echo)
    _launch(ctx, record.id, ray_address, root, record.info.get("model"))


def _same_root(record, output_root: Path) -> str:
    """This command's output root, resolved, when it is the one the sweep was submitted with (else exit 2)."""
    root = str(output_root.expanduser().resolve())
    if record.output_root and record.output_root != root:
        raise UsageError(f"sweep {record.id} keeps its artifacts under {record.output_root}, but this command's "
                         f"output root is {root}: give --output-root {record.output_root} (or QFARM_OUTPUT_ROOT)")
    return root


def _launch(ctx: click.Context, sweep_id: str, ray_address: str | None, root: str, model: str | None) -> None:
    """Start the sweep's scheduler (here through Ray, or as a Ray Job on a cluster's dashboard address) and the
    watchdog that resumes it should its head die."""
    from qfarm.farm import ray_jobs as jobs
    from qfarm.farm import scheduler, watchdog

    url, namespace = ctx.obj["redis_url_resolved"], ctx.obj["namespace"]
    if jobs.is_jobs_address(ray_address):
        jobs.start_scheduler(ray_address, sweep_id, namespace, url, root, click.echo)
    else:
        scheduler.start(sweep_id, url, namespace, root, _worker_env(model))
    watchdog.ensure(url, namespace, root, ray_address)


def _worker_env(model: str | None) -> dict[str, str]:
    """What the scheduler and its workers get from this shell through Ray's object store (qfarm.farm.handoff), never
    through Redis or a log: the hub token (for a hub model also the one `hf auth login` saved), offline mode,
    the hub cache."""
    from qfarm.results.tracking import forwarded_env
    from qfarm.sweep import hub
    from qfarm.sweep.sources import HUB_ID

    token = hub.saved_token() if isinstance(model, str) and HUB_ID.match(model) else None
    return {**hub.forwarded_env(token=token), **forwarded_env()}


@cli.command()
@click.argument("sweep", required=False, shell_complete=_complete_sweeps)
@click.option("--all", "show_all", is_flag=True, help="Every job of a large sweep, not only the first 60.")
@click.option("--json", "as_json", is_flag=True,
              help="JSON on stdout: all sweeps with their counts, or one sweep with its jobs and ETA.")
@click.option("--watch", is_flag=True, help="With SWEEP: refresh in place until the sweep is done (Ctrl-C leaves it "
                                            "running): every job, what the running ones do, the ETA, their Ray "
                                            "dashboard pages.")
@click.option("--interval", type=click.FloatRange(0.2, 3600), default=1.0, show_default=True, metavar="SECONDS",
              help="How often --watch refreshes.")
@_wide_option
@click.pass_context
@handle_errors
def status(ctx: click.Context, sweep: str | None, show_all: bool, as_json: bool, watch: bool, interval: float,
           wide: bool) -> None:
    """All sweeps, or one sweep's jobs (status, attempts, duration, what each running job is doing, the ETA)."""
    import json

    from qfarm.results.fit import show, terminal_width
    from qfarm.results.progress import STATUS_ROWS, jobs_table, sweep_json, sweep_summaries, sweeps_table, watch_sweep

    store = _store(ctx)
    if sweep is None:
        if watch:
            raise UsageError("--watch follows one sweep: qfarm status SWEEP --watch")
        if as_json:
            click.echo(json.dumps(sweep_summaries(store), indent=1))
            return
        width = terminal_width(wide)
        show(sweeps_table(store, width), width)
        return
    record = _find(store, sweep)
    if as_json:
        click.echo(json.dumps(sweep_json(store, record), indent=1, default=str))
        return
    if watch:
        watch_sweep(store, record.id, interval, wide, limit=None if show_all else STATUS_ROWS)
        return
    width = terminal_width(wide)
    table = jobs_table(record, store.sweep_jobs(record.id), store.stats(record.id),
                       limit=None if show_all else STATUS_ROWS, width=width, history=store.durations())
    show(table, width)


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script (verbs, options and sweep names): add
    `eval "$(qfarm completion bash)"` to ~/.bashrc (zsh: ~/.zshrc; fish: `qfarm completion fish | source`)."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    click.echo(cls(cli, {}, "qfarm", "_QFARM_COMPLETE").source())


@cli.command()
@click.argument("sweeps", nargs=-1, required=True, metavar="SWEEP...", shell_complete=_complete_sweeps)
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json", "parquet"]), default="table",
              show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write to this file instead of the terminal (required for parquet).")
@click.option("--where", multiple=True, metavar="COND",
              help="Keep rows where COND holds: method=gptq, 'bits<=4', status!=succeeded, method=gptq|awq. Repeatable.")
@click.option("--sort", default=None, metavar="COLUMN", help="Sort by a column; -COLUMN for descending.")
@click.option("--columns", default=None, metavar="A,B,...", help="Only these columns, in this order.")
@click.option("--frontier", default=None, metavar="A,B,...",
              help="Objectives of the Pareto frontier (default size_mb,perplexity,decode_tokens_per_s).")
@_wide_option
@click.option("--to", "to", type=click.Choice(["mlflow", "wandb"]), default=None,
              help="Send the rows to MLflow instead: an experiment per sweep, a run per job (params, metrics, loss "
                   "history, pipeline parents; sending again updates the runs); or to W&B: offline runs under "
                   "<output root>/wandb for `wandb sync` (WANDB_MODE=online: straight to your W&B).")
@click.option("--tracking-uri", default=None, metavar="URI",
              help="With --to mlflow: the tracking server or store (http://HOST:5000, sqlite:///FILE.db, a folder) "
                   "[default: MLFLOW_TRACKING_URI, else sqlite:///<the sweep's output root>/mlflow.db].")
@click.option("--experiment", default=None, metavar="NAME",
              help="With --to mlflow and one sweep: the experiment's name [default: the sweep id]; with --to wandb: "
                   "the W&B project [default: qfarm].")
@click.option("--copy-artifacts", is_flag=True,
              help="With --to mlflow: copy each job's artifact folder into its run (default: its path as a tag).")
@click.pass_context
@handle_errors
def results(ctx: click.Context, sweeps: tuple[str, ...], fmt: str, output: Path | None, where: tuple[str, ...],
            sort: str | None, columns: str | None, frontier: str | None, wide: bool, to: str | None,
            tracking_uri: str | None, experiment: str | None, copy_artifacts: bool) -> None:
    """The comparison table of one or more sweeps: one row per job (failed jobs too, with their reason),
    deltas against each sweep's reference, and the Pareto frontier marked ★. With --to mlflow, the same rows
    go to an MLflow tracking store."""
    from qfarm.results.compare import pick_columns

    if to is None and (tracking_uri or experiment or copy_artifacts):
        raise UsageError("--tracking-uri, --experiment and --copy-artifacts go with --to mlflow")
    if to == "wandb" and (tracking_uri or copy_artifacts):
        raise UsageError("--tracking-uri and --copy-artifacts are MLflow's: W&B runs go under <output root>/wandb")
    if experiment and len(sweeps) > 1 and to == "mlflow":
        raise UsageError("--experiment names one sweep's experiment: give one SWEEP (each sweep is an experiment)")
    store = _store(ctx)
    records = [_find(store, s) for s in sweeps]
    ids = [r.id for r in records]
    data, _, note = _compared(store, ids, list(where), sort, frontier)
    if note:
        click.echo(f"note: {note}", err=True)
    if to == "mlflow":
        _to_mlflow(store, records, data, tracking_uri, experiment, copy_artifacts)
        return
    if to == "wandb":
        from qfarm.results.tracking import to_wandb

        for record in records:
            to_wandb(record, [r for r in data if r.get("sweep_id") == record.id],
                     {j.id: j.job for j in store.sweep_jobs(record.id)}, experiment, str(Path(_root_of(record)) / "wandb"),
                     say=click.echo)
        return
    cols = pick_columns(data, columns)
    if fmt == "parquet":
        if output is None:
            raise UsageError("--format parquet writes a binary file: give -o FILE.parquet")
        from qfarm.results.rows import only, to_parquet

        to_parquet(only(data, cols), str(output))
        click.echo(f"wrote {len(data)} rows to {output}")
        return
    _print_results(data, ", ".join(ids), fmt, cols, output, wide)


@cli.command()
@click.argument("sweeps", nargs=-1, required=True, metavar="SWEEP...", shell_complete=_complete_sweeps)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=Path("report.html"),
              show_default=True, help="The HTML file to write (self-contained: no network needed to view it).")
@click.option("--png", "png_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the plots as PNG files into this folder.")
@click.option("--where", multiple=True, metavar="COND", help="As in `qfarm results`.")
@click.option("--frontier", default=None, metavar="A,B,...", help="As in `qfarm results`.")
@click.pass_context
@handle_errors
def report(ctx: click.Context, sweeps: tuple[str, ...], output: Path, png_dir: Path | None,
           where: tuple[str, ...], frontier: str | None) -> None:
    """An HTML report of one or more sweeps: the table, size-vs-perplexity with the frontier, memory and speed
    bars, training loss curves, prompt answers side by side, and the spec and environment of each sweep."""
    store = _store(ctx)
    records = [_find(store, s) for s in sweeps]
    data, objectives, note = _compared(store, [r.id for r in records], list(where), None, frontier)
    from qfarm.results.report import write_report

    written = write_report(data, records, output, png_dir, objectives, note)
    click.echo(f"wrote {output} ({len(data)} rows)" + (f" and {len(written)} PNG files in {png_dir}" if png_dir else ""))


@cli.command()
@click.argument("sweep", metavar="SWEEP|JOB", shell_complete=_complete_sweeps)
@click.option("--grace", type=click.FloatRange(0, 86_400), default=DEFAULT_CANCEL_GRACE_S, show_default=True,
              metavar="SECONDS", help="How long a running job has to stop by itself before its worker is killed.")
@click.pass_context
@handle_errors
def cancel(ctx: click.Context, sweep: str, grace: float) -> None:
    """Cancel a sweep, or one job by its id: queued jobs at once; running ones stop at their next progress point,
    or their worker process is killed after --grace seconds. `qfarm retry` runs cancelled jobs again."""
    store = _store(ctx)
    if re.fullmatch(r"j[0-9a-f]{12}", sweep) and store.job(sweep) is not None:
        outcome = store.request_job_cancel(sweep, grace)
        said = {"dequeued": "cancelled (it had not started)", "stopping": f"is being stopped (killed after {grace:g} s)"}
        click.echo(f"job {sweep} {said.get(outcome, f'is already {outcome}; nothing to cancel')}")
        return
    record = _find(store, sweep)
    n = store.request_cancel(record.id, grace)
    running = sum(1 for j in store.sweep_jobs(record.id) if j.status == "running")
    click.echo(f"cancelled {n} queued job(s) of {record.id}; {running} running job(s) are being stopped "
               f"(killed after {grace:g} s if they have not stopped)")


@cli.command()
@handle_errors
def down() -> None:
    """Stop the local Ray head qfarm started (sweeps on it stop too; their state stays in Redis), and the
    watchdogs that would start it again to resume them."""
    from qfarm.farm.cluster import stop_embedded_head
    from qfarm.farm.watchdog import stop_all

    stop_all()
    click.echo("stopped the local Ray head" if stop_embedded_head() else "no local Ray head of qfarm is running")


def _root_of(record) -> str:
    """Where a sweep keeps its artifacts (and, by default, its MLflow store and W&B runs)."""
    return record.output_root or str(Path(OUTPUT_ROOT_DEFAULT).resolve())


def _to_mlflow(store, records, data: list[dict], uri: str | None, experiment: str | None, copy: bool) -> None:
    from qfarm.results.tracking import Sender, cli_uri_problem, resolve_uri, shown, web_address

    problem = cli_uri_problem(uri) if uri else None
    if problem:
        raise UsageError(f"--tracking-uri {uri!r}: {problem}")
    for record in records:
        rows = [r for r in data if r.get("sweep_id") == record.id]
        target = uri or resolve_uri(None, _root_of(record))
        try:
            sender = Sender(target, record, experiment, copy, say=click.echo)
            done = sender.send(rows, {j.id: j.job for j in store.sweep_jobs(record.id)})
        except Exception as e:  # noqa: BLE001 - MLflow's own refusal (a store it cannot open, a server that says no)
            if not type(e).__module__.startswith("mlflow"):
                raise
            raise QfarmError(f"MLflow at {shown(target)} refused the runs: {one_line(e)}") from None
        click.echo(f"sent {len(rows)} job(s) of {record.id} to MLflow at {shown(target)}: experiment {sender.experiment!r} "
                   f"(id {sender.experiment_id}): {done['created']} run(s) created, {done['updated']} updated, "
                   f"{done['unchanged']} unchanged")
        click.echo(f"  open it: {web_address(shown(target), sender.experiment_id)}")


def _find(store, text: str):
    record = store.find_sweep(text)
    if record is None:
        known = store.sweep_ids()[-5:]
        hint = f" Recent sweeps: {', '.join(known)}" if known else " No sweeps yet: `qfarm submit SPEC`."
        raise UsageError(f"no sweep {text!r} in namespace {store.namespace!r}.{hint}")
    return record


def _compared(store, sweep_ids: list[str], where: list[str], sort: str | None, frontier: str | None):
    """(the rows compared, the frontier's objectives, a note on them or None)."""
    from qfarm.results.compare import compare_noted, parse_frontier
    from qfarm.results.rows import rows

    # a job reused from another sweep shows under the sweep asked for (deltas pair it with that sweep's reference)
    data = [dict(r, sweep_id=sid) for sid in sweep_ids for r in rows(store.sweep_jobs(sid))]
    return compare_noted(data, where, sort, parse_frontier(frontier, data), chosen=frontier is not None)


def _print_results(data: list[dict], title: str, fmt: str, columns: list[str] | None = None,
                   output: Path | None = None, wide: bool = False) -> None:
    from qfarm.results.rows import answers_text, render, rich_table

    if fmt != "table":
        text = render(data, fmt, columns)
        if output is None:
            click.echo(text, nl=False)
        else:
            output.write_text(text, encoding="utf-8")
            click.echo(f"wrote {len(data)} rows to {output}")
        return
    from rich.console import Console

    from qfarm.results.fit import terminal_width

    file = open(output, "w", encoding="utf-8") if output is not None else None  # noqa: SIM115
    try:
        # a terminal gets the columns that fit it (--wide: all); a file or a pipe the whole table, nothing cut
        width = None if file is not None else terminal_width(wide)
        table = rich_table(data, title=f"sweep {title}", columns=columns, width=width)
        console = Console(width=width or max(160, Console(width=100_000).measure(table).maximum), file=file)
        console.print(table)
        text = answers_text(data, width=max(60, width or 100))
        if text and not columns:
            console.print(text, markup=False, highlight=False)
    finally:
        if file is not None:
            file.close()


def main() -> None:
    cli(obj={}, prog_name="qfarm")


if __name__ == "__main__":
    main()
