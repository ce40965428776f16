"""The command line. ``qexplorer`` alone opens the app.

Heavy imports (textual, torch, transformers) happen inside the command that
needs them, so ``qexplorer monitor --once --json`` starts in a blink.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from qexplorer import __version__
from qexplorer.core.domain.load import DEFAULT_LOAD_MAX_TOKENS, DEFAULT_LOAD_PROMPT_TOKENS, DEFAULT_LOAD_REPETITIONS
from qexplorer.core.errors import UserError
from qexplorer.core.simulate import PROFILES as PROFILE_CHOICES


def _common(parser: argparse.ArgumentParser, *, sub: bool = True) -> None:
    # On sub-commands the defaults are suppressed, so `qexplorer --simulate gb10
    # monitor` keeps the value given before the command name.
    default = argparse.SUPPRESS if sub else None
    parser.add_argument(
        "--simulate",
        default=default,
        choices=PROFILE_CHOICES,
        metavar="PROFILE",
        help="draw a simulated machine instead of this one (demo mode): " + ", ".join(PROFILE_CHOICES)
        + "; jobs still run, are planned and are guarded on this machine",
    )
    parser.add_argument("--reserve-gib", type=float, default=default,
                        help="safety reserve kept free, GiB (default 8)")
    parser.add_argument("--refresh", type=float, dest="refresh_s", default=default,
                        help="sampling interval, s (0.25-10; default 1)")
    parser.add_argument("--theme", default=default, help="theme name (qexplorer-dark, qexplorer-light, ...)")
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if sub else False,
                        help="show tracebacks")
    parser.add_argument("--allow-download", action="store_true", default=argparse.SUPPRESS if sub else False,
                        help="allow model hubs to be contacted (off by default)")


def _load_flags(parser: argparse.ArgumentParser, levels: str, instead: str = "") -> None:
    """The load sweep's flags (bench-server and run): its levels, objective and stop rule."""
    parser.add_argument("--load", nargs="?", const=levels, metavar="C,C,...",
                        help=f"a load sweep at these concurrency levels (alone: {levels}), {instead}errors counted, "
                        "stopped early at saturation, goodput under the objective")
    parser.add_argument("--slo-ttft-p99", type=float, metavar="S",
                        help="the objective's TTFT p99 limit in seconds (default: the setting slo_ttft_p99_s, 2)")
    parser.add_argument("--slo-itl-p99", type=float, metavar="MS",
                        help="the objective's ITL p99 limit in milliseconds (default: the setting "
                        "slo_itl_p99_ms, 100)")
    parser.add_argument("--slo-error-rate", type=float, default=0.0, metavar="PCT",
                        help="the objective's largest share of failed requests, in %% (default 0)")
    parser.add_argument("--stop-error-rate", type=float, default=10.0, metavar="PCT",
                        help="--load stops after a level with at least this %% of failed requests (default 10)")
    parser.add_argument("--stop-min-gain", type=float, default=10.0, metavar="PCT",
                        help="--load stops at saturation: output tok/s up less than this %% over the best earlier "
                        "level while TTFT p99 grew over 25 %% (default 10)")
    parser.add_argument("--stop-beyond-slo", type=float, metavar="FACTOR",
                        help="--load also stops after a level that misses a limit of the objective by more than "
                        "FACTOR times (default: off)")
    parser.add_argument("--metrics-interval", type=float, default=0.5, metavar="S",
                        help="scrape the server's /metrics every S seconds during each level; 0: never (default 0.5)")


def _loading(parser: argparse.ArgumentParser) -> None:
    """The options of commands that load a model's weights."""
    _common(parser)
    parser.add_argument("model", metavar="MODEL", help="'default', a Hugging Face cache id, a folder or a .gguf file")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a checkpoint's own Python code to run (off by default)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle-only checkpoints (off by default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qexplorer",
        description="Choose how to quantize an LLM: live memory, plans, benchmarks, quality.",
    )
    parser.add_argument("--version", action="version", version=f"qexplorer {__version__}")
    _common(parser, sub=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    app = sub.add_parser("app", help="open the app (the default)")
    _common(app)
    app.add_argument("--model", default="default", help="model to start with (default: the bundled model)")

    monitor = sub.add_parser("monitor", help="the live memory dashboard, or one snapshot with --once")
    _common(monitor)
    monitor.add_argument("--once", action="store_true", help="print one snapshot and exit")
    monitor.add_argument("--json", action="store_true", help="with --once: print JSON")

    models = sub.add_parser("models", help="list the models qexplorer can find (no weights are loaded)")
    _common(models)
    models.add_argument("paths", nargs="*", metavar="PATH", help="extra model folders or GGUF files")
    models.add_argument("--json", action="store_true", help="print JSON")

    plan = sub.add_parser("plan", help="plan memory per precision against live headroom")
    _common(plan)
    plan.add_argument("model", metavar="MODEL", help="'default', a Hugging Face cache id, a folder or a .gguf file")
    plan.add_argument("--context", type=int, help="context length in tokens (default: settings, 4096)")
    plan.add_argument("--batch", type=int, default=1, help="concurrent sequences (default 1)")
    plan.add_argument("--kv-dtype", default="f16", help="KV-cache dtype: f32, f16, bf16, fp8, q8_0, q4_0")
    plan.add_argument("--precision", help="comma-separated precisions (default: all)")
    plan.add_argument("--quality", action="store_true", help="estimate each job with its quality pass")
    plan.add_argument("--json", action="store_true", help="print JSON")

    run = sub.add_parser("run", help="quantize and benchmark precisions in worker processes")
    _loading(run)
    run.add_argument("--precision", required=True, help="comma-separated precisions, e.g. bf16,int8,q4_k_m")
    run.add_argument("--no-quick-pass", action="store_true",
                     help="measure with the full method only (default: a quick pass of each precision not measured "
                          "before comes first, so that every one is answered within minutes)")
    run.add_argument("--quick", action="store_true", help="pp64/tg16 × 2 repetitions instead of pp512/tg128 × 5")
    run.add_argument("--repetitions", type=int, help="timed repetitions (default 5, quick 2)")
    run.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    run.add_argument("--depth", default="0", metavar="D,D,...",
                     help="context depths: pp and tg again after that many prefilled tokens (llama-bench -d; "
                          "default 0)")
    run.add_argument("--force", action="store_true", help="run even when the plan says it does not fit")
    run.add_argument("--as-listed", action="store_true",
                     help="run in the order given (default: cheapest first - GGUF, data-free, then calibrated)")
    run.add_argument("--remeasure", action="store_true",
                     help="measure again even where a stored result has the same artifact, engine, versions, "
                          "machine and settings (default: show that result again, marked reused)")
    run.add_argument("--one-at-a-time", action="store_true",
                     help="never prepare the next job beside the running one (default: overlap untimed work when "
                          "both fit in memory; timed phases always run alone)")
    run.add_argument("--json", action="store_true", help="print the results as JSON")
    run.add_argument("--quality", action="store_true", help="also measure KLD, top-1 and perplexity vs the reference")
    run.add_argument("--corpus", help="evaluation text: a UTF-8 file or a folder (default: shipped prose + stdlib)")
    run.add_argument("--reference", choices=("bf16", "fp32"), default="bf16", help="reference precision")
    run.add_argument("--quality-tokens", type=int, default=4096, help="tokens of evaluation text (default 4096)")
    run.add_argument("--quality-ctx", type=int, default=512, help="chunk length for quality (default 512)")
    run.add_argument("--tasks", metavar="TASK,...",
                     help="after each benchmark, task accuracy with the same engine: humaneval, arith or arith:N "
                          "(chains of 1 to N steps, default 8); greedy, every item kept for paired comparisons")
    run.add_argument("--tasks-limit", type=int, metavar="N",
                     help="at most N items per task (HumanEval: the first N; arith: spread over the lengths)")
    run.add_argument("--allow-unisolated-exec", action="store_true",
                     help="let HumanEval run model-written code even where the sandbox has no network isolation")
    _load_flags(run, "1,2,4,8", "after each full job's benchmark, in its serving engine (vLLM, llama-server): ")
    run.add_argument("--load-prompt-tokens", type=int, default=DEFAULT_LOAD_PROMPT_TOKENS, metavar="N",
                     help=f"--load: each request's prompt, in tokens (default {DEFAULT_LOAD_PROMPT_TOKENS})")
    run.add_argument("--load-max-tokens", type=int, default=DEFAULT_LOAD_MAX_TOKENS, metavar="N",
                     help=f"--load: each request's exact output, in tokens (default {DEFAULT_LOAD_MAX_TOKENS})")
    run.add_argument("--load-repetitions", type=int, default=DEFAULT_LOAD_REPETITIONS, metavar="N",
                     help=f"--load: timed rounds per level after its warm-up (default {DEFAULT_LOAD_REPETITIONS})")
    run.add_argument("--engine-args", default="", metavar="ARGS",
                     help="extra arguments for the serving engine, recorded with the result "
                          "(vLLM: \"--tensor-parallel-size 2\")")

    export = sub.add_parser("export", help="write a quantized model a server loads (GGUF or a vLLM folder)")
    _loading(export)
    export.add_argument("--precision", required=True, help="one precision, e.g. q4_k_m or fp8")
    export.add_argument("--out", required=True, help="the GGUF file or folder to write")

    server = sub.add_parser("bench-server", help="benchmark a running OpenAI-compatible server (vLLM, llama-server)")
    _common(server)
    server.add_argument("url", metavar="URL", help="base URL, e.g. http://127.0.0.1:8000")
    server.add_argument("--concurrency", default="1,4,16", help="concurrency levels (default 1,4,16)")
    server.add_argument("--repetitions", type=int, default=3, help="repetitions per level (default 3)")
    server.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (tg, default 64)")
    server.add_argument("--prompt-tokens", type=int, default=128, help="prompt tokens per request (pp, default 128)")
    server.add_argument("--depth", default="0", metavar="D,D,...",
                        help="context tokens before each prompt (llama-benchy --depth; default 0)")
    server.add_argument("--same-prompt", action="store_true",
                        help="send the same prompt every time (a prefix-cache test); default: unique prompts")
    server.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    server.add_argument("--api-key-env", help="name of the environment variable that holds the API key")
    server.add_argument("--quality", metavar="MODEL", help="also compare the server's log-probabilities with MODEL's "
                        "local reference ('default', a cache id, a folder or a GGUF file)")
    server.add_argument("--quality-tokens", type=int, default=1024, help="tokens of evaluation text (default 1024)")
    _load_flags(server, "1,2,4,8,16,32,64", "instead of --concurrency: ")
    server.add_argument("--json", action="store_true", help="print JSON")

    results = sub.add_parser("results", help="print stored results")
    _common(results)
    results.add_argument("--format", choices=("csv", "json", "md"), default="md")
    results.add_argument("--model", help="only this model (same forms as MODEL)")
    return parser


def _settings(args: argparse.Namespace):
    from qexplorer.core.settings import load_settings

    return load_settings().with_overrides(
        "the command line", refresh_s=args.refresh_s, reserve_gib=args.reserve_gib, theme=args.theme
    )


def _emit(as_json: bool, payload: object, text: Callable[[], str]) -> None:
    """Results on stdout: JSON when asked, the human table otherwise."""
    if as_json:
        json.dump(payload, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(text())


def _sample_once(args: argparse.Namespace, reserve_bytes: int):
    from qexplorer.core.simulate import make_sampler

    sampler = make_sampler(args.simulate, reserve_bytes=reserve_bytes)
    try:
        return sampler.sample()
    finally:
        sampler.close()


def cmd_app(args: argparse.Namespace, *, dashboard_only: bool = False) -> int:
    from qexplorer.ui.app import make_app
    from qexplorer.ui.sources import Sources

    settings = _settings(args)
    app = make_app(settings, Sources.for_profile(args.simulate, settings), dashboard_only=dashboard_only,
                   model_ref=getattr(args, "model", "default"))
    app.run()
    return app.return_code or 0


def cmd_monitor(args: argparse.Namespace) -> int:
    if not args.once:
        return cmd_app(args, dashboard_only=True)
    from qexplorer.cli.text import snapshot_text

    snapshot = _sample_once(args, _settings(args).reserve_bytes)
    _emit(args.json, snapshot.to_json(), lambda: snapshot_text(snapshot))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from qexplorer.cli.text import models_text
    from qexplorer.core.catalog import Catalog

    settings = _settings(args)
    entries = Catalog(extra_paths=tuple(settings.models) + tuple(args.paths)).scan()
    payload = {
        "schema": "qexplorer.models/1",
        "models": [{"ref": e.ref, "source": e.source, "error": e.error,
                    "model": e.spec.to_json() if e.spec else None} for e in entries],
    }
    _emit(args.json, payload, lambda: models_text(entries))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qexplorer.cli.text import plan_text
    from qexplorer.core import precisions
    from qexplorer.core.catalog import Catalog
    from qexplorer.core.planner import PlanRequest, plan_json, plan_model

    settings = _settings(args)
    from qexplorer.core.session import job_estimates, learned_vllm_overhead

    chosen = precisions.parse_list(args.precision)
    spec = Catalog(extra_paths=settings.models).resolve(args.model)
    snapshot = _sample_once(args, settings.reserve_bytes)
    request = PlanRequest(context=args.context or settings.default_context, batch=args.batch,
                          kv_dtype=args.kv_dtype, vllm_overhead_bytes=learned_vllm_overhead(settings.results_path, snapshot))
    plans = plan_model(spec, request, snapshot, chosen)
    document = plan_json(spec, request, snapshot, plans)
    if not snapshot.simulated:
        from qexplorer.core.domain.bench import BenchConfig
        from qexplorer.core.session import calibrate_machine

        calibrate_machine(settings.results_path, BenchConfig().thread_count,
                          lambda text: sys.stderr.write(text + "\n"))
    estimates = job_estimates(spec, chosen, settings.results_path, snapshot, quality=args.quality)
    for plan in document["plans"]:
        plan["job_estimate"] = estimates.get(plan["precision"])
    _emit(args.json, document, lambda: plan_text(document))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import signal

    from qexplorer.cli.run import run_precisions

    # Ctrl+C must stop the run cleanly even when started from a shell that ignores SIGINT (`cmd &`)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    settings = _settings(args)
    return run_precisions(args, settings)


def cmd_export(args: argparse.Namespace) -> int:
    from qexplorer.cli.run import export_precision

    return export_precision(args, _settings(args))


def cmd_bench_server(args: argparse.Namespace) -> int:
    from qexplorer.cli.server import bench_server

    return bench_server(args, _settings(args))


def cmd_results(args: argparse.Namespace) -> int:
    from qexplorer.core import results as results_mod
    from qexplorer.core.catalog import Catalog

    settings = _settings(args)
    store = results_mod.ResultsStore.in_dir(settings.results_path)
    model_path = Catalog(extra_paths=settings.models).resolve(args.model).path if args.model else None
    rows = store.comparable(model_path).all
    render = {"csv": results_mod.to_csv, "json": results_mod.to_json, "md": results_mod.to_markdown}[args.format]
    sys.stdout.write(render(rows))
    return 0


COMMANDS: dict[str | None, Callable[[argparse.Namespace], int]] = {
    None: cmd_app,
    "app": cmd_app,
    "monitor": cmd_monitor,
    "models": cmd_models,
    "plan": cmd_plan,
    "run": cmd_run,
    "results": cmd_results,
    "export": cmd_export,
    "bench-server": cmd_bench_server,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from qexplorer.core.safety import go_offline

    go_offline(getattr(args, "allow_download", False))
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        if args.debug:
            raise
        print(f"qexplorer: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qexplorer: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `qexplorer ... | head`: the reader left, not an error
        sys.stderr.close()
        return 0
