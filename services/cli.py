"""The ``autointerv`` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from services.core.infra import Endpoints

from services.core.config import (
    BackendConfig,
    Config,
    ConfigError,
    ReplayModelConfig,
    SimModelConfig,
    load_config,
    mask_url,
    parse_value,
    set_path,
)

DEFAULT_CONFIG = "examples/demo.yaml"  # of the working directory, else the packaged copy


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set a.b=c`` pairs to a nested dict (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key.path=value, got {pair!r}")
        set_path(tree, key.split("."), parse_value(raw, f"--set {key}"))
    return tree


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config is not None:
        return str(args.config)
    from services.core.bundled import default_config_path

    found = default_config_path()
    return str(found) if found else None


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args), overrides=_overrides(args.set or []))


def model_label(m: BackendConfig) -> str:
    """What a role runs, for the run header: ``sim``, ``replay:<file> [<model name>]``, ``vllm:<model>``."""
    if isinstance(m, SimModelConfig):
        return "sim (identical to base)" if m.sim.identical else "sim"
    if isinstance(m, ReplayModelConfig):
        name = f" [{m.replay_model_name}]" if m.replay_model_name else ""
        return f"replay:{m.path or m.model or '?'}{name}"
    return f"{m.backend}:{m.model or '?'}"


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from services.core.checks import warn_about_redis
    from services.core.infra import infrastructure
    from services.core.logs import setup_logging
    from services.orchestrator import run_pipeline_async
    from services.sink.table import load_results, render_table

    cfg = _load(args)
    log_file = Path(cfg.experiment.run_dir) / cfg.experiment_id / "autointerv.log"
    setup_logging(args.log_level, file=str(log_file))
    console.print(f"[bold]autointerv[/] experiment [cyan]{cfg.experiment_id}[/] — "
                  f"base={model_label(cfg.models.base)} intervention={model_label(cfg.models.intervention)}",
                  highlight=False)
    console.print(f"config: {_config_path(args) or '(defaults)'}", style="dim", highlight=False)
    external_cache = cfg.cache.url is not None
    with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
        print_attach(console, cfg, ep)
        if external_cache:
            for problem in asyncio.run(warn_about_redis(ep.redis_url)):
                console.print(f"[yellow]warning:[/] {problem}", highlight=False)
        outcome = asyncio.run(run_pipeline_async(cfg, ep, console))  # on the servers just printed
    results = load_results(outcome.run_dir)
    render_table(results.to_dict("records") if len(results) else [], console)
    console.print(f"\n{outcome.reason} in {outcome.wall_s:.0f}s — run directory: [cyan]{outcome.run_dir}[/]"
                  f" (report: {outcome.run_dir / 'report.html'})")
    return 0 if outcome.finished else 1


def print_attach(console: Console, cfg: Config, ep: Endpoints) -> None:
    """Where this run's servers are, so ``status``, ``top``, ``tail`` and plug-ins can attach."""
    exp = cfg.experiment_id
    console.print(f"broker [cyan]{ep.bootstrap}[/]  cache [cyan]{mask_url(ep.redis_url)}[/]  "
                  f"experiment [cyan]{exp}[/]", highlight=False)
    secret = (f" (password in {Path(cfg.experiment.data_dir) / 'valkey' / 'password'})" if ep.embedded_cache
              else "")
    console.print(f"[dim]attach: export KAFKA_BOOTSTRAP={ep.bootstrap} REDIS_URL=<the cache URL{secret}>; "
                  f"then autointerv status|top|tail TOPIC --experiment {exp}, or "
                  f"autointerv service NAME --set experiment.id={exp}[/]", highlight=False)


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
    if cfg.cache.url:
        from services.core.checks import warn_about_redis

        asyncio.run(warn_about_redis(cfg.cache.url))  # logged: a service's stderr is its log
    run_single(cfg, _service_name(args), args.tier)
    return 0


def _service_name(args: argparse.Namespace) -> str:
    """NAME, or ``--app module:obj`` (a Service class or a ``services.sdk.consumer``), importable from
    the working directory like any script's modules: no packaging, no entry point."""
    if bool(args.name) == bool(args.app):
        raise SystemExit("give a service NAME or --app module:obj, not both or neither")
    if not args.name:
        module, sep, attr = args.app.partition(":")
        if not (sep and module and attr):
            raise SystemExit(f"--app {args.app!r}: expected module:obj, e.g. examples.plugin_example:ValidatedCounter")
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())
        return args.app
    return args.name


def _attach(args: argparse.Namespace) -> Config:
    """The config with ``experiment.id`` set from ``--experiment`` (``latest`` resolved)."""
    from pydantic import ValidationError

    from services.core.config import format_validation_error
    from services.monitor.attach import resolve_experiment

    cfg = _load(args)
    if getattr(args, "experiment", None):
        try:
            cfg.experiment.id = resolve_experiment(cfg, args.experiment)
        except ValidationError as exc:
            raise ConfigError("--experiment: " + format_validation_error(exc)) from None
    return cfg


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops

    return cli_ops.cmd_status(_attach(args), console, experiment_given=bool(args.experiment))


def cmd_top(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops

    return cli_ops.cmd_top(args, _attach(args) if args.experiment else None, console)


def cmd_tail(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops

    cfg = _attach(args)
    return cli_ops.cmd_tail(args, cfg, cfg.experiment_id if args.experiment else None)


def cmd_infra(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops

    return cli_ops.cmd_infra(_load(args), console)


def cmd_clean(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops
    from services.monitor.attach import resolve_experiment

    cfg = _load(args)
    return cli_ops.cmd_clean(args, cfg, resolve_experiment(cfg, args.experiment), console)


def cmd_init(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops

    return cli_ops.cmd_init(args, console)


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from services import cli_ops

    return cli_ops.cmd_report(args, console)


def cmd_schemas(args: argparse.Namespace, console: Console) -> int:
    from services.core.bundled import schemas_dir
    from services.core.schemas import check_schemas, write_schemas

    folder = Path(args.dir) if args.dir else schemas_dir()
    if args.write:
        for p in write_schemas(folder):
            console.print(f"wrote {p}")
        return 0
    problems = check_schemas(folder)
    for p in problems:
        console.print(f"[red]{p}[/]")
    return 1 if problems else 0


def cmd_config(args: argparse.Namespace, console: Console) -> int:
    from services.core.config import dump_config

    console.print(dump_config(_load(args), mask_secrets=True), markup=False, highlight=False)
    return 0


EXPERIMENT_HELP = "experiment id, or `latest` (newest of <run_dir>/latest and the endpoint registry)"


def build_parser() -> argparse.ArgumentParser:
    from services.cli_ops import KCAT_NOTE

    p = argparse.ArgumentParser(prog="autointerv", description=__doc__)
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="JSON logs on stderr at this level (default WARNING; `run` also writes INFO "
                        "logs to <run dir>/autointerv.log)")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", "-c", help=f"experiment YAML (default: {DEFAULT_CONFIG} if present, "
                                               "else the packaged demo config)")
        sp.add_argument("--set", "-s", action="append", metavar="KEY=VALUE",
                        help="override a config field, e.g. --set controller.max_texts=4000")
        return sp

    with_config(sub.add_parser("run", help="run the whole pipeline for one experiment")).set_defaults(func=cmd_run)
    sp = with_config(sub.add_parser("service", help="run one service (or plug-in) of an experiment"))
    sp.add_argument("name", nargs="?", help="a built-in service or an autointerv.services entry point")
    sp.add_argument("--app", metavar="MODULE:OBJ", help="run a consumer that is not packaged, e.g. "
                                                          "examples.plugin_example:ValidatedCounter")
    sp.add_argument("--tier", help="validator tier name (validator only; default: the first)")
    sp.set_defaults(func=cmd_service)
    sp = with_config(sub.add_parser("status", help="endpoints of an experiment, end offsets per topic, lag per "
                                                   "consumer group"))
    sp.add_argument("--experiment", "-e", help=EXPERIMENT_HELP)
    sp.set_defaults(func=cmd_status)
    sp = with_config(sub.add_parser("top", help="terminal view of running processes' /metrics"))
    sp.add_argument("--url", default="http://127.0.0.1:9464/metrics", help="one process's /metrics")
    sp.add_argument("--experiment", "-e", help="scrape every registered endpoint of this " + EXPERIMENT_HELP)
    sp.add_argument("--refresh", type=float, default=1.0)
    sp.add_argument("--once", action="store_true")
    sp.set_defaults(func=cmd_top)
    sp = with_config(sub.add_parser(
        "tail", help="print a topic's events as JSON lines",
        description="Print a topic's events as JSON lines (the event plus _topic/_partition/_offset), without "
                    "joining a consumer group. " + KCAT_NOTE))
    sp.add_argument("topic", help="logical (texts, dead-letters, ...) or physical (<prefix>.texts) topic name")
    sp.add_argument("--experiment", "-e", help="only this " + EXPERIMENT_HELP)
    sp.add_argument("--from-beginning", action="store_true", help="start at the oldest event, not the end")
    sp.add_argument("-n", type=int, metavar="N", help="exit after printing N events")
    sp.add_argument("--exit-at-end", action="store_true", help="exit at the end of the topic instead of following")
    sp.set_defaults(func=cmd_tail)
    with_config(sub.add_parser("infra", help="start the embedded broker and cache and print their addresses")
                ).set_defaults(func=cmd_infra)
    sp = with_config(sub.add_parser("clean", help="delete an experiment's Redis state (and, with --run-dir, its "
                                                  "run directory)"))
    sp.add_argument("experiment", help=EXPERIMENT_HELP)
    sp.add_argument("--run-dir", action="store_true", help="also delete <run_dir>/<experiment>")
    sp.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    sp.set_defaults(func=cmd_clean)
    sp = sub.add_parser("init", help="write a commented starter config")
    sp.add_argument("path", nargs="?", default="autointerv.yaml")
    sp.add_argument("--name", help="experiment.name (default: from the file name)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(func=cmd_init)
    sp = sub.add_parser("schemas", help="check (default) or --write the JSON Schema files")
    sp.add_argument("--write", action="store_true")
    sp.add_argument("--dir", help="default: ./schemas if present, else the packaged schemas")
    sp.set_defaults(func=cmd_schemas)
    with_config(sub.add_parser("config", help="print the resolved, validated config")).set_defaults(func=cmd_config)
    sp = sub.add_parser("report", help="print the hypothesis table of a run directory")
    sp.add_argument("run_dir", nargs="?", default="runs/latest")
    fmt = sp.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the rows as a JSON array on stdout")
    fmt.add_argument("--csv", action="store_true", help="the rows as CSV on stdout")
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
