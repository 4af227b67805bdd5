"""``airflow-synth``: look after OpenAI / Azure OpenAI batch runs from a shell, outside any DAG.

Works from an Airflow connection id (resolved the Airflow way: ``AIRFLOW_CONN_<ID>`` environment variables,
a secrets backend, or the metadata database) and a run's manifest (its ``manifest.json`` or output folder)
or batch ids. It reuses the operators' own pieces: :class:`~airflow_provider_synth.runs.openai.BatchRun`
to find, collect and merge a run's batches, and
:func:`~airflow_provider_synth.runs.cleanup.clean_up_batch_files` to delete old files. It imports
``runs/`` and ``hooks/``, never ``operators/``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_synth._compat import metastore_connections
from airflow_provider_synth.batch.paths import as_path

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_CONN_ID = "synth_openai_default"
OPENAI_BACKENDS = ("openai", "azure_openai")

DESCRIPTION = """\
Check, collect, cancel and clean up OpenAI / Azure OpenAI batch runs of airflow-provider-synth.

A run is named by its manifest: the manifest.json an OpenAIBatchOperator wrote (also its XCom), or
the output folder that holds it (a local path or an object storage URL such as s3://bucket/run).
status and cancel also take batch ids (--batch-id).

The API key comes from an Airflow connection (--conn-id; by default the one recorded in the manifest,
else synth_openai_default), looked up the Airflow way: an AIRFLOW_CONN_<ID> environment variable, your
secrets backend, or the metadata database. The key is never printed.
"""

EPILOG = """\
examples:
  # how far along is a run? (per batch and in total)
  airflow-synth status /data/synth/example_openai_batch/manual__2025-01-01
  airflow-synth status --batch-id batch_abc123 --batch-id batch_def456 --conn-id my_openai

  # land the results of a run submitted with wait_for_completion=False, waiting until it finishes
  airflow-synth download s3://bucket/synth/run-1/manifest.json --wait

  # stop a run's batches that are still running
  airflow-synth cancel /data/synth/run-1

  # delete files this provider left on the account more than 7 days ago (preview first)
  airflow-synth cleanup --older-than 7 --dry-run
  airflow-synth cleanup --older-than 7
  airflow-synth cleanup /data/synth/run-1 --dry-run

  # machine-readable output
  airflow-synth --json status /data/synth/run-1 | jq .totals

  # the staging tables failed Cortex runs left in Snowflake, and dropping those older than 7 days
  airflow-synth cortex-staging --conn-id snowflake_default
  airflow-synth cortex-staging --older-than 7 --drop

exit codes:
  0  the command did what was asked
  1  it failed: an API error, batches still running (download), files or batches it could not delete
     or cancel
  2  usage error: bad arguments, a manifest that cannot be read, an unknown or incomplete connection
"""


class UsageError(Exception):
    """The command line or what it points at is wrong (exit code 2)."""


class CommandFailed(Exception):
    """The command ran and failed (exit code 1)."""


@dataclass
class Target:
    """What a command acts on: a run (manifest and, when readable, its plan) or bare batch ids."""

    conn_id: str
    manifest: dict[str, Any] | None = None
    plan: Any = None
    batch_ids: tuple[str, ...] = ()


# -- arguments ---------------------------------------------------------------------------------------------------


def _days(value: str) -> float:
    try:
        days = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {value!r}") from None
    if days < 0 or days != days:
        raise argparse.ArgumentTypeError(f"days must be >= 0, got {value}")
    return days


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """The ``airflow-synth`` argument parser."""
    # the common options work before or after the command name; SUPPRESS keeps a sub-command's
    # unset option from overwriting the value given before the command
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--conn-id", default=argparse.SUPPRESS, metavar="ID",
                        help="Airflow connection id (default: the manifest's, else synth_openai_default)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object instead of text")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="log API calls, and show tracebacks of unexpected errors")

    parser = argparse.ArgumentParser(prog="airflow-synth", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conn-id", default=None, metavar="ID",
                        help="Airflow connection id (default: the manifest's, else synth_openai_default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("-v", "--verbose", action="store_true", help="log API calls and show tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        examples = [line for line in EPILOG.splitlines() if line.startswith(f"  airflow-synth {name} ")]
        epilog = "examples:\n" + "\n".join(examples) + "\n\n" + EPILOG[EPILOG.index("exit codes:"):]
        return commands.add_parser(name, parents=[common], help=help_text, description=textwrap.fill(description, 100),
                                   epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)

    run_help = "a run's manifest.json, or the output folder holding it (path or URL)"

    def _target_args(sub: argparse.ArgumentParser, run_help: str) -> None:
        """A run (manifest or folder) or batch ids: what status and cancel act on."""
        sub.add_argument("run", nargs="?", metavar="MANIFEST", help=run_help)
        sub.add_argument("--batch-id", action="append", default=[], metavar="ID", help="a batch id (repeatable)")

    status = command("status", "counts and progress per batch, and totals",
                     "Show each batch's status and request counts, and the totals, of a run or of batch ids.")
    _target_args(status, run_help)

    download = command("download", "land a run's results in its output folder and merge them",
                       "Download every finished batch of a run (all shards and retry rounds) and merge them "
                       "into results.jsonl, failures.jsonl and manifest.json, as OpenAIBatchResultsOperator "
                       "does. Submits nothing: failed requests stay in failures.jsonl.")
    download.add_argument("run", metavar="MANIFEST", help=run_help)
    download.add_argument("--output", metavar="DIR", help="merge into this folder instead of the run's own")
    download.add_argument("--wait", action="store_true", help="wait for running batches instead of failing")
    download.add_argument("--poll-interval", type=_seconds, default=30.0, metavar="S",
                          help="seconds between checks with --wait (default 30)")
    download.add_argument("--timeout", type=_seconds, default=None, metavar="S",
                          help="give up waiting after this many seconds (default: no limit)")

    cancel = command("cancel", "cancel a run's (or these) batches that are still running",
                     "Ask the API to cancel every batch still running; finished ones are left alone. Cancelled "
                     "batches keep the answers they finished (collect them with download).")
    _target_args(cancel, run_help)

    cleanup = command("cleanup", "delete files this provider left on the account: older than N days, or a run's",
                      "Delete the inputs this provider uploaded (synth-<key>-s<shard>-r<round>.jsonl) and the "
                      "output and error files of the batches it created, older than --older-than days, or all "
                      "those of one run (MANIFEST). Never other files of the account, never a file a running "
                      "batch uses.")
    cleanup.add_argument("run", nargs="?", metavar="MANIFEST", help=f"{run_help}: only this run's files")
    cleanup.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                         help="delete files created more than DAYS days ago (fractions allowed); required "
                              "without MANIFEST, default 0 with it")
    cleanup.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")

    staging = command("cortex-staging", "list (or drop) the staging tables Cortex runs left in Snowflake",
                      "List, one line per run, the staging tables of CortexBatchOperator runs (kept after a failure "
                      "for a retry): only tables named <prefix>_<key>_{REQUESTS,RESULTS,STATEMENTS} and commented "
                      "by this provider. With --drop, drop the tables of the runs chosen by --run or --older-than, "
                      "never those of a run whose statements may still be running. Default connection: "
                      "snowflake_default.")
    staging.add_argument("--older-than", type=_days, default=None, metavar="DAYS",
                         help="only runs whose tables were created more than DAYS days ago")
    staging.add_argument("--run", action="append", default=[], metavar="PREFIX",
                         help="only this run (its table prefix, as listed; repeatable)")
    staging.add_argument("--database", metavar="DB", help="staging database (default: the connection's)")
    staging.add_argument("--schema", metavar="SCHEMA", help="staging schema (default: every schema)")
    staging.add_argument("--table-prefix", default="SYNTH_CORTEX", metavar="P", help="default SYNTH_CORTEX")
    staging.add_argument("--drop", action="store_true", help="drop the tables of the runs listed")
    staging.add_argument("--dry-run", action="store_true", help="with --drop: list what would be dropped")
    return parser


# -- targets -----------------------------------------------------------------------------------------------------


def _read_manifest(run: str) -> dict[str, Any] | None:
    """The manifest at ``run`` (a manifest.json or the output folder holding it); ``None`` when there is none
    yet: the task writes it when the run merges, so a run still going (or whose task died before merging) has
    only its plan (:func:`_plan_of_folder`)."""
    from airflow_provider_synth.batch.manifest import read_manifest

    try:
        manifest = read_manifest(as_path(run))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot read the manifest at {run!r}: {type(exc).__name__}: {exc}") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{run!r} is not a manifest (not a JSON object)")
    if manifest.get("backend") not in OPENAI_BACKENDS:
        raise UsageError(f"the manifest at {run!r} is from backend {manifest.get('backend')!r}; this command "
                         f"handles {' and '.join(OPENAI_BACKENDS)} runs")
    return manifest


def _load_plan(manifest: dict[str, Any], run: str, required: bool) -> Any:
    from airflow_provider_synth.runs.openai import Plan

    work_dir = manifest.get("work_dir")
    try:
        if not work_dir:
            raise FileNotFoundError(work_dir)
        return Plan.load(as_path(work_dir))
    except (FileNotFoundError, OSError, TypeError, ValueError) as exc:
        if required:
            raise UsageError(f"cannot read the run's plan under work_dir {work_dir!r} (from {run!r}): "
                             f"{type(exc).__name__}") from None
        return None


def _plan_of_folder(run: str) -> Any:
    """The plan of the run whose output folder (or work folder, or missing manifest.json) is ``run``: what every
    run keeps from before its first upload (``<output>/_work/plan.json``)."""
    from airflow_provider_synth.batch.paths import join_path
    from airflow_provider_synth.runs.openai import PLAN_FILE, Plan

    folder = run[: -len("/manifest.json")] if run.rstrip("/").endswith("/manifest.json") else run
    for work in (join_path(as_path(folder), "_work"), as_path(folder)):
        try:
            return Plan.load(work)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            continue
        except (OSError, TypeError, ValueError) as exc:
            raise UsageError(f"cannot read the run's plan under {str(work)!r}: {type(exc).__name__}: {exc}") \
                from None
    raise UsageError(f"no manifest and no run plan at {run!r} (looked for manifest.json and _work/{PLAN_FILE}): "
                     "give the output folder of a run (its output_path), or its manifest.json")


def _manifest_from_plan(plan: Any) -> dict[str, Any]:
    """What a manifest would say of a run that has none yet, from its plan (its batches come from the service)."""
    return {"backend": "openai", "status": "no manifest yet", "conn_id": plan.conn_id, "work_dir": plan.work_dir,
            "output_dir": plan.output_dir, "idempotency_key": plan.key, "total": plan.total, "batch_ids": []}


def resolve_target(args: argparse.Namespace, *, need_plan: bool = False) -> Target:
    """Turn ``MANIFEST`` / ``--batch-id`` / ``--conn-id`` into a :class:`Target`."""
    run, batch_ids = getattr(args, "run", None), tuple(getattr(args, "batch_id", None) or ())
    if run and batch_ids:
        raise UsageError("give a manifest or --batch-id, not both")
    if not run and not batch_ids:
        raise UsageError("give a manifest (or output folder), or at least one --batch-id")
    if not run:
        args.conn_id = args.conn_id or DEFAULT_CONN_ID
        return Target(conn_id=args.conn_id, batch_ids=batch_ids)
    manifest = _read_manifest(run)
    if manifest is None:  # still going, or its task died before merging: the plan is there from the start
        plan = _plan_of_folder(run)
        manifest = _manifest_from_plan(plan)
    else:
        plan = _load_plan(manifest, run, required=need_plan)
    conn_id = args.conn_id or manifest.get("conn_id") or (plan.conn_id if plan else None) or DEFAULT_CONN_ID
    args.conn_id = conn_id  # the connection whose secrets error messages are scrubbed of
    return Target(conn_id=conn_id, manifest=manifest, plan=plan,
                  batch_ids=tuple(manifest.get("batch_ids") or ()))


def _hook(conn_id: str) -> Any:
    from airflow_provider_synth.hooks.openai import OpenAIBatchHook

    return OpenAIBatchHook(conn_id)


def _batch_run(target: Target) -> Any:
    """The run's batches, found by its key (every shard and retry round, whatever the manifest lists)."""
    from airflow_provider_synth.runs.openai import BatchRun

    run = BatchRun(_hook(target.conn_id), target.plan, as_path)
    run.discover()
    return run


def _batch_rows(target: Target) -> list[dict[str, Any]]:
    """One row per batch: id, shard, round and its state (``batch_summary``), fresh from the API."""
    from airflow_provider_synth.hooks.openai import batch_summary
    from airflow_provider_synth.runs.openai import ROUND_META, SHARD_META

    if target.plan is not None:
        run = _batch_run(target)
        run.poll(tolerate_errors=False)
        return [{"batch_id": ref.batch_id, "shard": ref.shard, "round": ref.round, **ref.state}
                for _, ref in sorted(run.batches.items())]
    hook, rows = _hook(target.conn_id), []
    for batch_id in target.batch_ids:
        batch = hook.get_batch(batch_id)
        meta = batch.metadata or {}
        rows.append({"batch_id": batch.id, "shard": _int(meta.get(SHARD_META)), "round": _int(meta.get(ROUND_META)),
                     **batch_summary(batch)})
    return rows


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- commands ----------------------------------------------------------------------------------------------------


def _totals(rows: list[dict[str, Any]], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The batches' statuses, and the run's requests counted once each (:func:`_run_requests`)."""
    from airflow_provider_synth.batch.status import TERMINAL_STATUSES

    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
    counts = _run_requests(rows, manifest)
    done = counts["completed"] + counts["failed"]
    rounds = {r["round"] for r in rows if r.get("round") is not None}
    return {"batches": len(rows), "rounds": len(rounds) or None, "statuses": statuses, "requests": counts,
            "progress": round(done / counts["total"], 4) if counts["total"] else None,
            "finished": all(r["status"] in TERMINAL_STATUSES for r in rows)}


def _run_requests(rows: list[dict[str, Any]], manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Each request of the run once, however many rounds it went through.

    A merged run's manifest is the answer (``succeeded``, ``failed`` + ``missing``: the output checks'
    verdicts included). Before that, per shard: round 0 holds every request of the shard, and each retry round
    only failures of the round before, so the answered ones add up over the rounds, the last round's unfinished
    ones are pending, and the rest failed (so far: a later round may retry them). Batches without a shard (bare
    ``--batch-id``) are summed as they are.
    """
    from airflow_provider_synth.batch.status import TERMINAL_STATUSES

    if manifest and manifest.get("status") == "completed" and "succeeded" in manifest:
        failed = int(manifest.get("failed") or 0) + int(manifest.get("missing") or 0)
        return {"total": int(manifest["total"]), "completed": int(manifest["succeeded"]), "failed": failed,
                "pending": 0, "source": "manifest"}
    shards: dict[int, list[dict[str, Any]]] = {}
    loose = {"total": 0, "completed": 0, "failed": 0, "pending": 0}
    for row in rows:
        c = row["request_counts"]
        if row.get("shard") is None or row.get("round") is None:
            for key in ("total", "completed", "failed"):
                loose[key] += int(c.get(key) or 0)
            continue
        shards.setdefault(row["shard"], []).append(row)
    for rounds in shards.values():
        rounds.sort(key=lambda r: r["round"])
        first, last = rounds[0]["request_counts"], rounds[-1]["request_counts"]
        answered = sum(int(r["request_counts"].get("completed") or 0) for r in rounds)
        pending = 0 if rounds[-1]["status"] in TERMINAL_STATUSES else max(
            int(last.get("total") or 0) - int(last.get("completed") or 0) - int(last.get("failed") or 0), 0)
        total = int(first.get("total") or 0)
        loose["total"] += total
        loose["completed"] += answered
        loose["pending"] += pending
        loose["failed"] += max(total - answered - pending, 0)
    return {**loose, "source": "batches"}


def cmd_status(args: argparse.Namespace, out: Output) -> int:
    target = resolve_target(args)
    rows = _batch_rows(target)
    if target.plan is not None and not rows:
        raise CommandFailed(f"no batch of run {target.plan.key} found on connection {target.conn_id!r}: "
                            "was it submitted with this connection?")
    totals = _totals(rows, target.manifest)
    result: dict[str, Any] = {"conn_id": target.conn_id, "batches": rows, "totals": totals}
    if target.manifest is not None:
        result["manifest_status"] = target.manifest.get("status")
    if target.plan is not None:
        result.update(run_key=target.plan.key, total_requests=target.plan.total, shards=len(target.plan.shards))
    out.emit(result, lambda: _status_text(result))
    return EXIT_OK


def _pct(done: int, total: int) -> str:
    return f"{100 * done / total:5.1f}%" if total else "    -"


def _status_text(result: dict[str, Any]) -> list[str]:
    w = max([len("batch"), *(len(row["batch_id"]) for row in result["batches"])])
    lines = [f"{'batch':<{w}} {'shard':>5} {'round':>5}  {'status':<12} {'completed':>9} {'failed':>7} "
             f"{'total':>7} {'progress':>8}"]
    for row in result["batches"]:
        c = row["request_counts"]
        shard = "-" if row["shard"] is None else str(row["shard"])
        rnd = "-" if row["round"] is None else str(row["round"])
        lines.append(f"{row['batch_id']:<{w}} {shard:>5} {rnd:>5}  {row['status']:<12} {c['completed']:>9} "
                     f"{c['failed']:>7} {c['total']:>7} {_pct(c['completed'] + c['failed'], c['total']):>8}")
        lines.extend(f"    ! {error}" for error in row.get("errors") or [])
    t = result["totals"]
    r = t["requests"]
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(t["statuses"].items()))
    lines.append(f"{'total':<{w}} {'':>5} {'':>5}  {t['batches']:<12} {r['completed']:>9} {r['failed']:>7} "
                 f"{r['total']:>7} {_pct(r['completed'] + r['failed'], r['total']):>8}")
    source = "from the manifest" if r.get("source") == "manifest" else "so far, from the batches"
    lines.append(f"requests of the run (each counted once, {source}): {r['total']:,} total, "
                 f"{r['completed']:,} answered, {r['failed']:,} failed, {r.get('pending', 0):,} pending")
    lines.append(f"{t['batches']} batch(es): {statuses or 'none'}; "
                 + ("all finished" if t["finished"] else "still running"))
    return lines


def _wait(run: Any, args: argparse.Namespace, out: Output) -> None:
    """Fresh states; with ``--wait``, the operators' worker-side wait (same verdict, same error tolerance)."""
    run.poll(tolerate_errors=False)
    if args.wait:
        end_time = time.time() + args.timeout if args.timeout else None
        run.wait(args.poll_interval, end_time,
                 progress=lambda s: out.note(f"waiting for {len(run.running_ids)} batch(es): {s}"))
    if run.running_ids:
        hint = f"gave up after {args.timeout:g}s" if args.wait else "run again later, or pass --wait"
        raise CommandFailed(f"{len(run.running_ids)} of {len(run.batches)} batch(es) still running "
                            f"({', '.join(run.running_ids[:5])}); {hint}")


def cmd_download(args: argparse.Namespace, out: Output) -> int:
    from airflow_provider_synth.batch.manifest import write_manifest

    target = resolve_target(args, need_plan=True)
    plan = target.plan
    if args.output:
        plan.output_dir = args.output if "://" in args.output else os.path.abspath(args.output)
    run = _batch_run(target)
    if not run.batches:
        raise CommandFailed(f"no batch of run {plan.key} found on connection {target.conn_id!r}: "
                            "was it submitted with this connection?")
    _wait(run, args, out)
    acct = run.merge()
    source = target.manifest or {}
    from airflow_provider_synth.runs.openai import run_manifest

    plan.conn_id = target.conn_id
    manifest = run_manifest(
        run, acct.as_dict(), "completed", **run.costs(acct), collected_by="airflow-synth",
        **{k: source.get(k) for k in ("dag_id", "task_id", "run_id", "map_index", "try_number")},
    )
    write_manifest(as_path(plan.output_dir), manifest)
    out.emit(manifest, lambda: _download_text(manifest))
    return EXIT_OK


def _download_text(m: dict[str, Any]) -> list[str]:
    lines = [f"{m['succeeded']} succeeded, {m['failed']} failed, {m['missing']} missing of {m['total']} "
             f"request(s) from {len(m['batch_ids'])} batch(es)",
             f"results:  {m['results_path']}", f"failures: {m['failures_path']}", f"manifest: {m['manifest_path']}"]
    from airflow_provider_synth.batch.usage import format_usd

    usage = m.get("usage") or {}
    cost = format_usd(m.get("cost_usd"))
    lines.append(f"usage: {usage.get('prompt_tokens', 0):,} prompt + {usage.get('completion_tokens', 0):,} "
                 f"completion tokens; cost {cost}")
    if m.get("retryable"):
        lines.append(f"{m['retryable']} failure(s) could succeed on retry: re-run the Airflow task "
                     "(OpenAIBatchResultsOperator) to resubmit only those")
    return lines


def cmd_cancel(args: argparse.Namespace, out: Output) -> int:
    from airflow_provider_synth.batch.status import TERMINAL_STATUSES

    target = resolve_target(args)
    hook = _hook(target.conn_id)
    rows = _batch_rows(target)
    results, failed = [], 0
    for row in rows:
        entry = {"batch_id": row["batch_id"], "before": row["status"], "status": row["status"], "action": "none"}
        if row["status"] not in TERMINAL_STATUSES and row["status"] != "cancelling":
            try:
                entry["status"], entry["action"] = hook.cancel_batch(row["batch_id"]).status, "cancelled"
            except Exception as exc:  # keep cancelling the others; report each failure
                entry["action"], entry["error"] = "error", _error_text(exc)
                failed += 1
        results.append(entry)
    summary = {"conn_id": target.conn_id, "batches": results,
               "cancelled": sum(e["action"] == "cancelled" for e in results), "errors": failed}
    out.emit(summary, lambda: _cancel_text(summary))
    return EXIT_FAILURE if failed else EXIT_OK


def _cancel_text(summary: dict[str, Any]) -> list[str]:
    lines = []
    for e in summary["batches"]:
        what = {"cancelled": f"cancel requested ({e['before']} -> {e['status']})",
                "error": f"could not cancel: {e.get('error')}"}.get(e["action"], f"left alone ({e['status']})")
        lines.append(f"{e['batch_id']}: {what}")
    lines.append(f"{summary['cancelled']} batch(es) cancelled, {summary['errors']} error(s)")
    return lines


def cmd_cleanup(args: argparse.Namespace, out: Output) -> int:
    from airflow_provider_synth.runs.cleanup import clean_up_batch_files

    run_key = None
    if args.run:
        target = resolve_target(args)
        run_key = (target.manifest or {}).get("idempotency_key")
        if not run_key:
            raise UsageError(f"the manifest at {args.run!r} names no run key (idempotency_key)")
        conn_id = target.conn_id
    elif args.older_than is None:
        raise UsageError("give --older-than DAYS, or a run (manifest or output folder) to clean up")
    else:
        conn_id = args.conn_id or DEFAULT_CONN_ID
    older_than = 0.0 if args.older_than is None else args.older_than
    summary = clean_up_batch_files(_hook(conn_id), older_than, dry_run=args.dry_run, logger=out, run_key=run_key)
    result = {"conn_id": conn_id, "run_key": run_key, **summary.as_dict()}
    out.emit(result, lambda: _cleanup_text(result))
    return EXIT_FAILURE if summary.errors else EXIT_OK


def _cleanup_text(r: dict[str, Any]) -> list[str]:
    verb = "would delete" if r["dry_run"] else "deleted"
    lines = [f"{verb} {r['deleted']} file(s), {r['bytes']:,} bytes ({r['uploads']} uploaded inputs, "
             f"{r['outputs']} batch outputs) older than {r['older_than_days']:g} days (before {r['cutoff']})"
             + (f" of run {r['run_key']}" if r.get("run_key") else ""),
             f"kept {r['kept_recent']} newer file(s) and {r['kept_running']} used by running batches; "
             "other files of the account are never touched"]
    lines.extend(f"could not delete {e['file_id']}: {e['error']}" for e in r["errors"])
    return lines


def cmd_cortex_staging(args: argparse.Namespace, out: Output) -> int:
    from airflow_provider_synth.hooks.cortex import CortexHook
    from airflow_provider_synth.runs.cortex_staging import staging_report, staging_report_text

    if args.drop and not (args.run or args.older_than is not None):
        raise UsageError("--drop needs --run PREFIX or --older-than DAYS (use --older-than 0 for every run)")
    args.conn_id = args.conn_id or "snowflake_default"
    hook = CortexHook(args.conn_id)
    try:
        report = staging_report(hook, database=args.database, schema=args.schema, table_prefix=args.table_prefix,
                                older_than_days=args.older_than, prefixes=args.run, drop=args.drop,
                                dry_run=args.dry_run)
    finally:
        hook.close()
    out.emit({"conn_id": args.conn_id, **report}, lambda: staging_report_text(report))
    return EXIT_FAILURE if report["not_found"] or report.get("errors") else EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace, Output], int]] = {
    "status": cmd_status, "download": cmd_download, "cancel": cmd_cancel, "cleanup": cmd_cleanup,
    "cortex-staging": cmd_cortex_staging,
}


# -- output and errors -------------------------------------------------------------------------------------------


class Output:
    """Text or JSON on stdout; notes and per-file lines on stdout in text mode, nothing extra in JSON mode.

    Also a ``logger`` for :func:`clean_up_batch_files` (its ``info`` lines become text output).
    """

    def __init__(self, as_json: bool, stream: Any = None) -> None:
        self.as_json, self.stream = as_json, stream

    def _write(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout)

    def emit(self, data: dict[str, Any], text: Callable[[], list[str]]) -> None:
        if self.as_json:
            import orjson

            self._write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode())
        else:
            for line in text():
                self._write(line)

    def note(self, text: str) -> None:
        if not self.as_json:
            self._write(text)

    def info(self, msg: str, *args: Any) -> None:
        self.note(msg % args if args else msg)


def _error_text(exc: BaseException) -> str:
    from airflow.providers.common.compat.sdk import redact

    return str(redact(f"{type(exc).__name__}: {exc}"))


def _classify(exc: Exception) -> tuple[int, str] | None:
    """Exit code and message for errors a user can act on; ``None`` for unexpected ones."""
    import openai
    from airflow.providers.common.compat.sdk import AirflowNotFoundException

    from airflow_provider_synth.exceptions import ConnectionConfigError, SynthError

    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, AirflowNotFoundException):
        return EXIT_USAGE, (f"{exc}: define it (e.g. an AIRFLOW_CONN_<ID> environment variable, or "
                            "`airflow connections add`), or pass --conn-id")
    if isinstance(exc, ConnectionConfigError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return EXIT_FAILURE, f"the API refused the connection's credentials ({type(exc).__name__}): {exc}"
    if isinstance(exc, openai.APIConnectionError):
        return EXIT_FAILURE, f"cannot reach the API ({type(exc).__name__}): check the connection's base URL"
    if isinstance(exc, CommandFailed):
        return EXIT_FAILURE, str(exc)
    if isinstance(exc, openai.OpenAIError | SynthError):
        return EXIT_FAILURE, f"{type(exc).__name__}: {exc}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``airflow-synth``; returns the exit code (see ``airflow-synth --help``)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad arguments, 0 on --help
        return int(exc.code or 0)
    with metastore_connections(), _stdout_for_output_only(args.verbose) as stdout:
        return _run(args, Output(args.json, stdout))


@contextlib.contextmanager
def _stdout_for_output_only(verbose: bool) -> Iterator[Any]:
    """Keep stdout for the command's output (one JSON object with ``--json``): Airflow logs to stdout once
    imported, through stdlib handlers and structlog loggers. Point both at stderr, keep only warnings unless
    ``--verbose``, and yield the real stdout. Everything is restored afterwards."""
    import logging

    import airflow.sdk  # noqa: F401  (configures logging on import)

    stdout, root = sys.stdout, logging.getLogger()
    level, moved = root.level, []
    for handler in root.handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is stdout:
            moved.append(handler)
            handler.setStream(sys.stderr)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield stdout
    finally:
        root.setLevel(level)
        for handler in moved:
            handler.setStream(stdout)


def _run(args: argparse.Namespace, out: Output) -> int:
    try:
        return COMMANDS[args.command](args, out)
    except Exception as exc:
        from airflow.providers.common.compat.sdk import redact  # knows every connection looked up

        classified = _classify(exc)
        if classified is None and args.verbose:
            raise
        code, message = classified or (EXIT_FAILURE, f"unexpected error {_error_text(exc)} "
                                                     "(run with --verbose for the traceback)")
        print(f"airflow-synth: error: {redact(message)}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
