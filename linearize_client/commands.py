"""`linearize submit` (a job on a remote service, for CI) and `linearize serve` (API + worker).

`serve` starts `uvicorn service.main:app` and `celery -A worker.app worker` as child processes,
so no Python module imports both the service and the worker. Neither command imports torch.
Exit codes match the local `compress`: 0 ok, 1 quality gate failed, 2 bad input, 3 failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_RUNTIME = 0, 1, 2, 3


# submit ----------------------------------------------------------------------------------


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    from linearize_client.options import add_compress_options, add_memory_options

    p.add_argument(
        "--remote",
        default=os.environ.get("LINEARIZE_REMOTE"),
        help="service URL (env LINEARIZE_REMOTE)",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("LINEARIZE_TOKEN"),
        help="API key (env LINEARIZE_TOKEN)",
    )
    p.add_argument("--kind", default="compress", choices=["compress", "analyze"])
    p.add_argument("--model", help="the alias smollm2-135m (default) or a model the service has")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="local text file to upload, or 'wikitext2'")
    source.add_argument("--dataset-id", help="a dataset already uploaded")
    p.add_argument("--text-field", default=None)
    add_compress_options(p, budget_required=False)
    add_memory_options(p)
    p.add_argument("--calib-tokens", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--webhook-url")
    p.add_argument("--idempotency-key", help="retrying with the same key never queues twice")
    p.add_argument("--wait", action="store_true", help="follow the job to its end")
    p.add_argument("--output", type=Path, help="with --wait: download the checkpoint here")
    p.add_argument("--report", type=Path, help="with --wait: write report.json here")
    p.add_argument(
        "--summary",
        type=Path,
        default=None,
        help="append a Markdown summary here (default: $GITHUB_STEP_SUMMARY when set)",
    )
    p.add_argument("--timeout", type=float, default=6 * 3600.0, help="seconds to wait")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _err(message: str) -> None:
    print(f"linearize submit: {message}", file=sys.stderr)


def _build_spec(args: argparse.Namespace, data: dict[str, Any]):
    from pydantic import TypeAdapter

    from api_schemas import JobSpec
    from linearize_client.options import compress_fields, given_compress_options, memory_fields

    body: dict[str, Any] = {"kind": args.kind, "data": data}
    for name in ("model", "calib_tokens", "seq_len", "dtype", "device", "seed", "webhook_url"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    body.update(memory_fields(args))
    if args.metadata:
        pairs = [m.partition("=") for m in args.metadata]
        if any(not sep or not key for key, sep, _ in pairs):
            raise ValueError("--metadata wants KEY=VALUE")
        body["metadata"] = {key: value for key, _, value in pairs}
    if args.kind == "compress":
        body.update(compress_fields(args))
    elif given_compress_options(args):
        raise ValueError(f"{', '.join(given_compress_options(args))} need --kind compress")
    return TypeAdapter(JobSpec).validate_python(body)


def submit_main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from linearize_client.client import ApiError, IntegrityError, LinearizeClient, format_detail

    if not args.remote:
        _err("--remote URL is required (or set LINEARIZE_REMOTE)")
        return EXIT_INPUT
    if (args.output or args.report) and not args.wait:
        _err("--output and --report need --wait")
        return EXIT_INPUT
    upload: Path | None = None
    if args.dataset_id:
        data: dict[str, Any] = {"dataset_id": args.dataset_id}
    elif args.data == "wikitext2":
        data = {"builtin": "wikitext2"}
    else:
        upload = Path(args.data)
        if not upload.is_file():
            _err(f"--data {args.data}: no such file")
            return EXIT_INPUT
        data = {"dataset_id": "pending-upload"}
    if args.text_field:
        data["text_field"] = args.text_field
    try:
        spec = _build_spec(args, data)  # validated here first: bad flags cost no upload
    except (ValidationError, ValueError) as exc:
        _err(_validation_message(exc))
        return EXIT_INPUT

    summary_path = args.summary or (
        Path(os.environ["GITHUB_STEP_SUMMARY"]) if os.environ.get("GITHUB_STEP_SUMMARY") else None
    )
    try:
        with LinearizeClient(args.remote, args.token) as client:
            if upload is not None:
                dataset = client.upload_dataset(upload)
                print(
                    f"uploaded   {upload} -> {dataset.id} ({dataset.bytes} bytes)", file=sys.stderr
                )
                spec = spec.model_copy(
                    update={"data": spec.data.model_copy(update={"dataset_id": dataset.id})}
                )
            job = client.submit(spec, idempotency_key=args.idempotency_key or str(uuid.uuid4()))
            print(f"job        {job.id} {job.status}", file=sys.stderr)
            if not args.wait:
                print(job.model_dump_json(indent=2))
                return EXIT_OK
            try:
                _follow(client, job.id, quiet=args.quiet, timeout=args.timeout)
            except KeyboardInterrupt:
                client.cancel(job.id)
                _err(f"interrupted; cancelled job {job.id}")
                return EXIT_RUNTIME
            return _finish(client, job.id, args, summary_path)
    except ApiError as exc:
        _err(f"the service refused: {exc}")
        if summary_path:
            _append(
                summary_path, f"### linearize: request refused\n\n{format_detail(exc.detail)}\n"
            )
        # 4xx (except throttling) means the request itself was wrong: same code as bad input.
        return (
            EXIT_INPUT if 400 <= exc.status_code < 500 and exc.status_code != 429 else EXIT_RUNTIME
        )
    except IntegrityError as exc:
        _err(f"download failed verification: {exc}")
        return EXIT_RUNTIME
    except Exception as exc:  # network and everything else: a runtime failure, exit 3
        _err(f"{type(exc).__name__}: {exc}")
        return EXIT_RUNTIME


def _validation_message(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if not str(p).endswith('Spec')) or 'spec'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
    return str(exc)


def _follow(client, job_id: str, *, quiet: bool, timeout: float) -> None:
    """Progress bar per stage from the SSE stream (on stderr, so stdout stays clean)."""
    from tqdm import tqdm

    deadline = time.monotonic() + timeout
    bar = None
    stage = None
    try:
        for event in client.stream_events(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s")
            if event.type == "progress" and not quiet:
                if event.stage != stage or bar is None:
                    if bar is not None:
                        bar.close()
                    stage = event.stage
                    bar = tqdm(
                        total=event.total or None,
                        desc=f"{stage:<9}",
                        file=sys.stderr,
                        leave=False,
                        dynamic_ncols=True,
                    )
                if event.total:
                    bar.total = event.total
                bar.n = event.current
                if event.message:
                    bar.set_postfix_str(event.message[:40], refresh=False)
                bar.refresh()
            elif event.type == "status":
                if bar is not None:
                    bar.close()
                    bar, stage = None, None
                detail = f" ({event.message})" if event.message else ""
                print(f"status     {event.status}{detail}", file=sys.stderr)
    finally:
        if bar is not None:
            bar.close()


def _finish(client, job_id: str, args: argparse.Namespace, summary_path: Path | None) -> int:
    job = client.get_job(job_id)
    report = None
    if job.status == "succeeded":
        report = client.report(job_id)
        if args.report:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            args.report.write_text(json.dumps(report, indent=2), encoding="utf-8")
        if args.output:
            manifest = client.download_checkpoint(job_id, args.output)
            print(
                f"output     {args.output} ({len(manifest.items)} files, sha256 verified)",
                file=sys.stderr,
            )
    if summary_path:
        _append(summary_path, summary_markdown(job, report))
    if job.status == "succeeded":
        gate = (report or {}).get("gate")
        if gate is not None and not gate.get("passed", True):
            _err("quality gate failed")
            return EXIT_GATE
        return EXIT_OK
    if job.status == "failed" and job.error is not None:
        _err(f"job failed: {job.error.code}: {job.error.message}")
        return job.error.exit_code if job.error.exit_code in (EXIT_INPUT, EXIT_RUNTIME) else 3
    _err(f"job {job.status}")
    return EXIT_RUNTIME


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(text if text.endswith("\n") else text + "\n")


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def summary_markdown(job, report: dict[str, Any] | None) -> str:
    """A GitHub step summary: outcome, layers, perplexity, gate, size."""
    gate = (report or {}).get("gate")
    if job.status == "succeeded":
        ok = gate is None or gate.get("passed", True)
        headline = "succeeded" if ok else "quality gate failed"
        icon = "✅" if ok else "❌"
    else:
        headline, icon = job.status, "❌"
    lines = [f"### {icon} linearize {job.kind}: {headline}", "", "| | |", "|---|---|"]
    lines.append(f"| job | `{job.id}` (attempts: {job.attempts}) |")
    lines.append(f"| model | `{getattr(job.spec, 'model', '')}` |")
    if job.error is not None:
        lines.append(f"| error | `{job.error.code}`: {job.error.message} |")
    if report:
        model = report.get("model") or {}
        before, after = model.get("layers_before"), model.get("layers_after")
        if after is not None:
            replaced = report.get("replaced_layers") or []
            lines.append(f"| layers | {before} → {after} (replaced {replaced}) |")
        ppl = report.get("perplexity") or {}
        if ppl.get("baseline") is not None:
            text = f"{ppl['baseline']:.3f}"
            if ppl.get("compressed") is not None:
                text += f" → {ppl['compressed']:.3f}"
            if ppl.get("increase_pct") is not None:
                text += f" ({ppl['increase_pct']:+.2f} %)"
            lines.append(f"| perplexity | {text} |")
        for text in report.get("eval_texts") or []:
            if text.get("increase_pct") is not None:
                lines.append(
                    f"| perplexity `{text['name']}` | {text['baseline']:.3f} → "
                    f"{text['compressed']:.3f} ({text['increase_pct']:+.2f} %) |"
                )
        if model.get("bytes_after") is not None:
            lines.append(
                f"| size | {_fmt_bytes(model.get('bytes_before'))} → "
                f"{_fmt_bytes(model.get('bytes_after'))} |"
            )
        quantized = model.get("source_quantization")
        if quantized:
            lines.append(
                f"| quantized source | {quantized['scheme']} ({quantized['dtype']}), "
                f"{_fmt_bytes(quantized['bytes'])} → {quantized.get('output_dtype') or '–'}, "
                f"{_fmt_bytes(quantized.get('output_bytes'))} written dequantized |"
            )
        lines += _behaviour_rows(report)
        for rule in (gate or {}).get("rules", []):
            verdict = "passed" if rule.get("passed") else "**failed**"
            lines.append(
                f"| gate `{rule.get('name')}` | {rule.get('value'):.4g} "
                f"{rule.get('comparison', '<=')} {rule.get('limit')}: {verdict} |"
            )
        lines += _search_curve(report)
    return "\n".join(lines) + "\n"


def _search_curve(report: dict[str, Any]) -> list[str]:
    """--layers max: every k the search measured (validation slice), the chosen one in bold."""
    curve = report.get("curve") or []
    if not curve:
        return []
    lines = [
        "",
        f"**Size against quality** (chosen k = {report['selection'].get('chosen_k')}):",
        "",
        "| k | trial | params removed | ppl increase | KL | top-1 | gates |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in curve:
        k = f"**{p['k']}**" if p.get("chosen") else str(p["k"])
        kl, top1 = p.get("kl"), p.get("top1_agreement_pct")
        lines.append(
            f"| {k} | {'healed' if p['healed'] else 'probe'} {p.get('method', '')} | "
            f"{p['params_removed']:,} | "
            f"{p['ppl_increase_pct']:+.1f} % | {'-' if kl is None else f'{kl:.4f}'} | "
            f"{'-' if top1 is None else f'{top1:.1f} %'} | "
            f"{'pass' if p['passed'] else 'fail'} |"
        )
    return lines


def _behaviour_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    agreement = report.get("agreement")
    if agreement:
        rows.append(
            f"| agreement | KL {agreement['kl']:.4f} nats/token, top-1 "
            f"{100 * agreement['top1_agreement']:.1f} %, top-5 "
            f"{100 * agreement['top5_contains_top1']:.1f} % |"
        )
    generation = report.get("generation")
    if generation:
        rows.append(
            f"| generation | exact match {100 * generation['exact_match']:.0f} % of "
            f"{generation['prompts']}, common prefix {generation['mean_common_prefix']:.1f}/"
            f"{generation['new_tokens']} tokens |"
        )
    for task in report.get("tasks") or []:
        retained = task.get("retained_pct")
        rows.append(
            f"| task `{task['task']}` | acc {task['original']['acc']:.4f} → "
            f"{task['compressed']['acc']:.4f} (retained "
            f"{'-' if retained is None else f'{retained:.1f} %'}) |"
        )
    return rows


# serve -----------------------------------------------------------------------------------


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--data-dir",
        type=Path,
        help="jobs DB, embedded broker and artifacts "
        "(default LINEARIZE_DATA_DIR or ./linearize-data)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (one per GPU)")
    p.add_argument("--log-level", default="info")


def serve_command_lines(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    api = [
        sys.executable,
        "-m",
        "uvicorn",
        "service.main:app",
        "--host",
        args.host,
        "--port",
        str(args.port),
        "--log-level",
        args.log_level,
    ]
    worker = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "-c",
        str(args.concurrency),
        "--loglevel",
        args.log_level.upper(),
        "--without-gossip",
        "--without-mingle",
        "-n",
        f"serve-{os.getpid()}@{socket.gethostname()}",
    ]
    return api, worker


def dashboard_url(host: str, port: int) -> str:
    """Where a browser on this machine finds the pages (a wildcard bind is reached on loopback)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/ui"


def serve_main(args: argparse.Namespace) -> int:
    env = os.environ.copy()
    if args.data_dir is not None:
        env["LINEARIZE_DATA_DIR"] = str(args.data_dir.resolve())
    data_dir = Path(env.get("LINEARIZE_DATA_DIR", "linearize-data")).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    broker = env.get("LINEARIZE_BROKER_URL") or f"embedded (SQLite under {data_dir})"
    if not env.get("LINEARIZE_API_KEYS") and not env.get("LINEARIZE_API_KEYS_FILE"):
        print("linearize serve: no LINEARIZE_API_KEYS; every request will get 401", file=sys.stderr)
    print(f"linearize serve: http://{args.host}:{args.port}  broker: {broker}", file=sys.stderr)
    print(f"linearize serve: dashboard {dashboard_url(args.host, args.port)}", file=sys.stderr)
    api_cmd, worker_cmd = serve_command_lines(args)
    children = [subprocess.Popen(api_cmd, env=env), subprocess.Popen(worker_cmd, env=env)]

    def stop(*_sig) -> None:
        for child in children:
            if child.poll() is None:
                child.terminate()  # celery: warm shutdown, the running task finishes or requeues

    signal.signal(signal.SIGTERM, stop)
    try:
        while all(child.poll() is None for child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    stop()
    code = 0
    for child in children:
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        code = code or (child.returncode if child.returncode and child.returncode > 0 else 0)
    return code


# db ----------------------------------------------------------------------------------------


def add_db_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action",
        choices=["upgrade", "current"],
        help="upgrade: migrate the job store to this release's schema; current: show revisions",
    )
    p.add_argument("--url", help="SQLAlchemy URL (default LINEARIZE_DATABASE_URL or the embedded)")
    p.add_argument(
        "--data-dir", type=Path, help="where the embedded SQLite store lies (LINEARIZE_DATA_DIR)"
    )


def db_main(args: argparse.Namespace) -> int:
    """Runs infra.migrate in a child, as serve runs the API: the client never imports infra."""
    env = os.environ.copy()
    if args.data_dir is not None:
        env["LINEARIZE_DATA_DIR"] = str(args.data_dir.resolve())
    command = [sys.executable, "-m", "infra.migrate", args.action]
    if args.url:
        command += ["--url", args.url]
    return subprocess.run(command, env=env, check=False).returncode
