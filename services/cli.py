"""The ``autointerv`` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from services.core.config import Config, ConfigError, load_config, parse_value, set_path

DEFAULT_CONFIG = "examples/demo.yaml"


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set a.b=c`` pairs to a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {pair!r}")
        set_path(tree, key.split("."), parse_value(raw, f"--set {key}"))
    return tree


def _load(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_config(path, overrides=_overrides(args.set or []))


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from services.core.logs import setup_logging
    from services.orchestrator import run_pipeline
    from services.sink.table import load_results, render_table

    cfg = _load(args)
    log_file = Path(cfg.experiment.run_dir) / cfg.experiment_id / "autointerv.log"
    setup_logging(args.log_level, file=str(log_file))
    console.print(f"[bold]autointerv[/] experiment [cyan]{cfg.experiment_id}[/] — "
                  f"base={cfg.models.base.backend}:{cfg.models.base.model or 'sim'} "
                  f"intervention={cfg.models.intervention.backend}:{cfg.models.intervention.model or 'sim'}")
    outcome = run_pipeline(cfg, console)
    results = load_results(outcome.run_dir)
    render_table(results.to_dict("records") if len(results) else [], console)
    console.print(f"\n{outcome.reason} in {outcome.wall_s:.0f}s — run directory: [cyan]{outcome.run_dir}[/]"
                  f" (report: {outcome.run_dir / 'report.html'})")
    return 0 if outcome.finished else 1


def cmd_service(args: argparse.Namespace, console: Console) -> int:
    from services.orchestrator import run_single

    cfg = _load(args)
    if args.name == "monitor":  # the faust-streaming topic monitor (docs/faust-spike.md)
        from services.core.infra import infrastructure
        from services.monitor.faust_app import run_monitor

        with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
            run_monitor(cfg, ep.bootstrap)
        return 0
    if not cfg.bus.bootstrap:
        console.print("[yellow]no KAFKA_BOOTSTRAP set: this service gets its own embedded broker; run "
                      "`autointerv infra` first and export its variables to share one[/]")
    run_single(cfg, args.name, args.tier)
    return 0


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from services.core.bus import Topics
    from services.monitor.status import collect_status, render_status
    from services.orchestrator import expected_groups

    cfg = _load(args)
    if not cfg.bus.bootstrap:
        console.print("[red]status needs a running broker: set KAFKA_BOOTSTRAP (see `autointerv infra`)[/]")
        return 2
    report = asyncio.run(collect_status(cfg.bus.bootstrap, Topics(cfg.bus.topic_prefix), expected_groups(cfg)))
    render_status(report, console)
    return 0


def cmd_top(args: argparse.Namespace, console: Console) -> int:
    from services.monitor.top import run_top

    run_top(args.url, args.refresh, once=args.once)
    return 0


def cmd_infra(args: argparse.Namespace, console: Console) -> int:
    from services.core.infra import infrastructure

    cfg = _load(args)
    with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
        console.print(f"export KAFKA_BOOTSTRAP={ep.bootstrap}\nexport REDIS_URL={ep.redis_url}")
        console.print("[dim]embedded broker and cache running; Ctrl-C stops them[/]")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_schemas(args: argparse.Namespace, console: Console) -> int:
    from services.core.schemas import check_schemas, write_schemas

    if args.write:
        for p in write_schemas(Path(args.dir)):
            console.print(f"wrote {p}")
        return 0
    problems = check_schemas(Path(args.dir))
    for p in problems:
        console.print(f"[red]{p}[/]")
    return 1 if problems else 0


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    from services.core.config import dump_config

    console.print(dump_config(_load(args)), markup=False, highlight=False)
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from services.sink.table import load_results, render_table

    results = load_results(Path(args.run_dir))
    render_table(results.to_dict("records") if len(results) else [], console)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autointerv", description=__doc__)
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="JSON logs on stderr at this level (default WARNING; `run` also writes INFO "
                        "logs to <run dir>/autointerv.log)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help=f"experiment YAML (default: {DEFAULT_CONFIG} if present)")
        sp.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set controller.max_texts=4000")
        return sp

    with_config(sub.add_parser("run", help="run the whole pipeline for one experiment")).set_defaults(func=cmd_run)
    sp = with_config(sub.add_parser("service", help="run one service (or plug-in) of an experiment"))
    sp.add_argument("name")
    sp.add_argument("--tier", help="validator tier name (validator only; default: the first)")
    sp.set_defaults(func=cmd_service)
    with_config(sub.add_parser("status", help="end offsets per topic and lag per consumer group")).set_defaults(
        func=cmd_status)
    sp = sub.add_parser("top", help="terminal view of a running process's /metrics")
    sp.add_argument("--url", default="http://127.0.0.1:9464/metrics")
    sp.add_argument("--refresh", type=float, default=1.0)
    sp.add_argument("--once", action="store_true")
    sp.set_defaults(func=cmd_top)
    with_config(sub.add_parser("infra", help="start the embedded broker and cache and print their addresses")
                ).set_defaults(func=cmd_infra)
    sp = sub.add_parser("schemas", help="check (default) or --write the JSON Schema files")
    sp.add_argument("--write", action="store_true")
    sp.add_argument("--dir", default="schemas")
    sp.set_defaults(func=cmd_schemas)
    with_config(sub.add_parser("config", help="print the resolved, validated config")).set_defaults(func=cmd_config)
    sp = sub.add_parser("report", help="print the hypothesis table of a run directory")
    sp.add_argument("run_dir", nargs="?", default="runs/latest")
    sp.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    from services.core.logs import setup_logging

    args = build_parser().parse_args(argv)
    console = Console()
    try:
        setup_logging(args.log_level)
        return int(args.func(args, console) or 0)
    except ConfigError as exc:
        console.print(str(exc), style="red", markup=False, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
