"""`linearize analyze|compress|eval|compare|serve|submit|db`.

Nothing heavy is imported at module level, so `linearize --help` answers without torch.
Exit codes: 0 ok, 1 quality gate failed (artifacts and report still written), 2 bad input or
usage, 3 runtime failure. Errors print one line; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

EXIT_OK, EXIT_GATE, EXIT_INPUT, EXIT_RUNTIME = 0, 1, 2, 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2, like every bad input
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser, *, model: bool = True) -> None:
    from linearize_client.options import add_memory_options

    if model:
        p.add_argument(
            "--model",
            required=True,
            help="hub id, local directory, .gguf file, or the alias smollm2-135m",
        )
    p.add_argument(
        "--data",
        required=True,
        help="text file, JSONL (field --text-field), or 'wikitext2' (the shared file)",
    )
    p.add_argument("--text-field", default="text")
    p.add_argument("--calib-tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    add_memory_options(p)
    p.add_argument("--report", type=Path, help="write report.json here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="tracebacks and debug logs")


def build_parser() -> argparse.ArgumentParser:
    from linearize_client.options import add_compress_options

    parser = _Parser(prog="linearize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("analyze", help="per-layer linearity analysis")
    _common(p)
    p.add_argument("--output", type=Path, help="directory for report.md and plots")

    p = sub.add_parser("compress", help="replace layers by linear maps, evaluate, save")
    _common(p)
    add_compress_options(p, budget_required=True)
    p.add_argument("--output", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace a non-empty --output")

    p = sub.add_parser("eval", help="perplexity of a model or saved checkpoint")
    _common(p)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument(
        "--reference",
        metavar="MODEL",
        help="the original model: also report KL, top-1 and top-5 agreement with it",
    )

    p = sub.add_parser("compare", help="the same analysis on several models")
    p.add_argument("--model", action="append", required=True, dest="models")
    _common(p, model=False)
    p.add_argument("--output", type=Path, help="directory for the table and plot")

    try:
        from linearize_client.commands import (
            add_db_arguments,
            add_serve_arguments,
            add_submit_arguments,
        )
    except ImportError:  # the service extra is not installed
        return parser
    add_serve_arguments(sub.add_parser("serve", help="API + worker on one machine"))
    add_submit_arguments(sub.add_parser("submit", help="run a job on a linearize service"))
    add_db_arguments(sub.add_parser("db", help="migrate the service's job store"))
    return parser


def spec_from_args(args: argparse.Namespace):
    from api_schemas import AnalyzeSpec, CompareSpec, CompressSpec, DataSpec, EvalSpec
    from linearize_client.options import memory_fields

    if args.data == "wikitext2":
        data = DataSpec(builtin="wikitext2")
    else:
        data = DataSpec(path=args.data, text_field=args.text_field)
    common = dict(
        data=data,
        calib_tokens=args.calib_tokens,
        seq_len=args.seq_len,
        dtype=args.dtype,
        device=args.device,
        seed=args.seed,
        **memory_fields(args),
    )
    if args.command == "analyze":
        return AnalyzeSpec(model=args.model, **common)
    if args.command == "eval":
        return EvalSpec(
            model=args.model, eval_tokens=args.eval_tokens, reference=args.reference, **common
        )
    if args.command == "compare":
        return CompareSpec(models=args.models, **common)
    from linearize_client.options import compress_fields

    try:
        fields = compress_fields(args)
    except ValueError as exc:
        raise _usage(str(exc)) from None
    return CompressSpec(model=args.model, **fields, **common)


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "debug", False) else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.command in ("serve", "submit", "db"):
        from linearize_client import commands

        return getattr(commands, f"{args.command}_main")(args)
    try:
        return _run_local(args)
    except KeyboardInterrupt:
        again = "; the same command resumes it" if args.command == "compress" else ""
        print(f"interrupted{again}", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # translated to an exit code here, at the boundary
        return _report_error(exc, args.debug)


def _run_local(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    try:
        spec = spec_from_args(args)
    except (ValidationError, _UsageError) as exc:
        print(f"linearize: error: {_validation_message(exc)}", file=sys.stderr)
        return EXIT_INPUT
    from linearize import pipeline
    from linearize.progress import TqdmSink
    from linearize.report import summary_lines

    _quiet_transformers()
    sink = TqdmSink(enabled=not args.quiet)
    try:
        report = pipeline.run(
            spec,
            output_dir=getattr(args, "output", None),
            report_path=args.report,
            progress=sink,
            force=getattr(args, "force", False),
        )
    finally:
        sink.close()
    print("\n".join(summary_lines(report)))
    if report.resumed is not None:
        resumed = report.resumed
        print("resumed    " + (", ".join(resumed.stages) or f"no: {resumed.refused}"))
    if getattr(args, "output", None) is not None:
        print(f"output     {args.output}")
    if report.gate is not None and not report.gate.passed:
        return EXIT_GATE
    return EXIT_OK


def _quiet_transformers() -> None:
    # Our own bars cover loading and saving; transformers' per-shard bars would interleave.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _validation_message(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
    return str(exc)


def _report_error(exc: Exception, debug: bool) -> int:
    from linearize.errors import LinearizeError

    if debug:
        import traceback

        traceback.print_exc()
    if isinstance(exc, LinearizeError):
        print(f"linearize: error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(
        f"linearize: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
        file=sys.stderr,
    )
    return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())
