"""The ``qfarm`` command line. Light on purpose: Ray is imported only by the verbs that need it, torch never.

Exit codes: 0 fine; 1 a failure (unreachable service, a job that failed); 2 bad input (spec, arguments,
resources no node has).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from .errors import QfarmError, SpecError, UsageError

OUTPUT_ROOT_DEFAULT = "qfarm-out"


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
            if os.environ.get("QFARM_DEBUG"):
                raise
            _err(f"internal error: {type(e).__name__}: {e} (set QFARM_DEBUG=1 for the traceback)")
            sys.exit(1)

    return wrapper


def _store(ctx: click.Context):
    from .connection import connect_redis
    from .store import Store

    obj = ctx.obj
    if "store" not in obj:
        client, url = connect_redis(obj["redis_url"], say=click.echo)
        obj["store"], obj["redis_url_resolved"] = Store(client, obj["namespace"]), url
    return obj["store"]


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
      qfarm status [SWEEP]
      qfarm results SWEEP --format table|md|csv|json
      qfarm cancel SWEEP
    """
    ctx.ensure_object(dict)
    ctx.obj.update(redis_url=redis_url, namespace=namespace)


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--jobs", "show_jobs", is_flag=True, help="List every job the sweep expands to.")
@handle_errors
def validate(spec: Path, show_jobs: bool) -> None:
    """Check a sweep file: every error at once, with its YAML path and line. Runs nothing."""
    from .expand import load_plan

    loaded, plan = load_plan(spec)
    kinds = ", ".join(f"{n} {k}" for k, n in plan.counts_by_kind().items())
    labels = sorted({j.label for j in plan.jobs if j.kind != "sleep"})
    what = f" ({', '.join(labels)})" if labels else ""
    model = f" on {loaded.spec.model}" if loaded.spec.model else ""
    click.echo(f"{spec}: valid. Sweep {plan.sweep_id}: {len(plan.jobs)} jobs: {kinds}{what}{model}")
    if show_jobs:
        for job in plan.jobs:
            opts = ", ".join(f"{k}={v}" for k, v in job.options.items())
            click.echo(f"  {job.id}  {job.kind:<8} {opts}")


@cli.command()
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--wait", is_flag=True, help="Show live progress, then print the comparison table.")
@click.option("--ray-address", envvar="QFARM_RAY_ADDRESS", default=None, metavar="ADDR",
              help="An existing Ray cluster (host:port, ray://host:10001, or auto) [env QFARM_RAY_ADDRESS]. "
                   "Default: qfarm's own local Ray head, started on first use.")
@click.option("--logical-gpus", type=click.IntRange(0, 64), envvar="QFARM_LOGICAL_GPUS", default=None,
              help="GPU slots the local head declares when the machine has no GPU (default 2).")
@click.option("--output-root", envvar="QFARM_OUTPUT_ROOT", default=OUTPUT_ROOT_DEFAULT, show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where artifacts go: <root>/<sweep>/<job>. Must be reachable by every node [env QFARM_OUTPUT_ROOT].")
@click.pass_context
@handle_errors
def submit(ctx: click.Context, spec: Path, wait: bool, ray_address: str | None, logical_gpus: int | None,
           output_root: Path) -> None:
    """Submit a sweep. Finished jobs of an identical earlier submit are reused, failed ones rerun."""
    from . import cluster, scheduler
    from .expand import load_plan

    loaded, plan = load_plan(spec)
    store = _store(ctx)
    cluster.connect(ray_address, logical_gpus, say=click.echo)
    payloads = [j.payload() for j in plan.jobs]
    cluster.preflight(payloads)
    root = str(output_root.expanduser().resolve())
    counts = store.submit(plan.sweep_id, plan.name, payloads, source=str(spec.resolve()), output_root=root,
                          info={"raw_spec": loaded.raw, "model": loaded.spec.model})
    scheduler.start(plan.sweep_id, ctx.obj["redis_url_resolved"], ctx.obj["namespace"])
    reused = counts.get("succeeded", 0)
    note = f" ({reused} reused from an earlier run)" if reused else ""
    click.echo(f"submitted {plan.sweep_id}: {len(plan.jobs)} jobs{note}; artifacts under {root}/{plan.name}")
    if not wait:
        click.echo(f"follow it with: qfarm status {plan.sweep_id}   results: qfarm results {plan.sweep_id}")
        return
    from .progress import follow

    follow(store, plan.sweep_id, alive=lambda: scheduler.alive(plan.sweep_id, ctx.obj["namespace"]))
    _print_results(store, plan.sweep_id, "table")
    failed = [j for j in store.sweep_jobs(plan.sweep_id) if j.status != "succeeded"]
    if failed:
        sys.exit(1)


@cli.command()
@click.argument("sweep", required=False)
@click.option("--all", "show_all", is_flag=True, help="Every job of a large sweep, not only the first 60.")
@click.pass_context
@handle_errors
def status(ctx: click.Context, sweep: str | None, show_all: bool) -> None:
    """All sweeps, or one sweep's jobs (status, attempts, duration, what each running job is doing)."""
    from rich.console import Console

    from .progress import STATUS_ROWS, jobs_table, sweeps_table

    store = _store(ctx)
    console = Console()
    if sweep is None:
        console.print(sweeps_table(store))
        return
    record = _find(store, sweep)
    jobs = store.sweep_jobs(record.id)
    console.print(jobs_table(record, jobs, store.stats(record.id), limit=None if show_all else STATUS_ROWS))


@cli.command()
@click.argument("sweep")
@click.option("--format", "fmt", type=click.Choice(["table", "md", "csv", "json"]), default="table",
              show_default=True)
@click.pass_context
@handle_errors
def results(ctx: click.Context, sweep: str, fmt: str) -> None:
    """The comparison table of a sweep: one row per job, failed jobs too."""
    store = _store(ctx)
    _print_results(store, _find(store, sweep).id, fmt)


@cli.command()
@click.argument("sweep")
@click.pass_context
@handle_errors
def cancel(ctx: click.Context, sweep: str) -> None:
    """Cancel a sweep: queued jobs at once, running ones are stopped by its scheduler."""
    store = _store(ctx)
    record = _find(store, sweep)
    n = store.request_cancel(record.id)
    running = sum(1 for j in store.sweep_jobs(record.id) if j.status == "running")
    click.echo(f"cancelled {n} queued job(s) of {record.id}; {running} running job(s) are being stopped")


@cli.command()
@handle_errors
def down() -> None:
    """Stop the local Ray head qfarm started (sweeps on it stop too; their state stays in Redis)."""
    from .cluster import stop_embedded_head

    click.echo("stopped the local Ray head" if stop_embedded_head() else "no local Ray head of qfarm is running")


def _find(store, text: str):
    record = store.find_sweep(text)
    if record is None:
        known = store.sweep_ids()[-5:]
        hint = f" Recent sweeps: {', '.join(known)}" if known else " No sweeps yet: `qfarm submit SPEC`."
        raise UsageError(f"no sweep {text!r} in namespace {store.namespace!r}.{hint}")
    return record


def _print_results(store, sweep_id: str, fmt: str) -> None:
    from .results import answers_text, render, rich_table, rows

    data = rows(store.sweep_jobs(sweep_id))
    if fmt != "table":
        click.echo(render(data, fmt), nl=False)
        return
    from rich.console import Console

    console = Console(width=max(Console().width, 160))
    console.print(rich_table(data, title=f"sweep {sweep_id}"))
    text = answers_text(data)
    if text:
        console.print(text, markup=False, highlight=False)


def main() -> None:
    cli(obj={}, prog_name="qfarm")


if __name__ == "__main__":
    main()
