"""The operator commands of ``autointerv``: infra, status, top, tail, clean, init and report.

Each takes the parsed arguments, the loaded config (where it needs one) and a console, and returns
the exit code; :mod:`services.cli` builds the parser.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
from pathlib import Path
from types import FrameType

from rich.console import Console

from services.core.config import SAFE_NAME, Config, ConfigError, load_config

KCAT_NOTE = ("kcat, confluent-kafka and other librdkafka clients cannot read the embedded Tansu broker "
             "(ApiVersionRequest failed: Local: Read underflow, also with api.version.request=false); "
             "this command uses aiokafka, which works against Tansu and any Kafka.")


class _Terminated(BaseException):
    """SIGTERM/SIGHUP turned into an exception, so ``with`` blocks stop their servers."""


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(signum)


def cmd_infra(cfg: Config, console: Console) -> int:
    """Start the embedded broker and cache; SIGTERM, SIGHUP and Ctrl-C stop both (a bare SIGTERM
    used to kill only this process and orphan Tansu and Valkey)."""
    from services.core.infra import infrastructure

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminated)
    try:
        with infrastructure(cfg.bus.bootstrap, cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
            print(f"export KAFKA_BOOTSTRAP={ep.bootstrap}\nexport REDIS_URL={ep.redis_url}", flush=True)
            if ep.embedded_cache:
                console.print("[dim]REDIS_URL holds the cache's password (kept in "
                              f"{Path(cfg.experiment.data_dir) / 'valkey' / 'password'}, mode 0600): "
                              "a secret for this machine's processes[/]")
            console.print("[dim]embedded broker and cache running; Ctrl-C or SIGTERM stops them[/]")
            while True:
                signal.pause()
    except (KeyboardInterrupt, _Terminated):
        pass
    return 0


# --------------------------------------------------------------------------- status, top, tail


def _endpoints_and_health(cfg: Config, experiment: str) -> list[tuple[object, str]]:
    import redis.asyncio as aioredis

    from services.core.endpoints import list_endpoints
    from services.monitor.status import probe_health

    async def go() -> list[tuple[object, str]]:
        client = aioredis.Redis.from_url(cfg.cache.url or "", socket_timeout=3, socket_connect_timeout=3)
        try:
            eps = await list_endpoints(client, cfg.cache.namespace, experiment)
        finally:
            await client.aclose()
        healths = await asyncio.gather(*(probe_health(e.url) for e in eps))
        return list(zip(eps, healths, strict=True))

    return asyncio.run(go())


def cmd_status(cfg: Config, console: Console, experiment_given: bool) -> int:
    from services.core.bus import Topics
    from services.monitor.status import collect_status, render_endpoints, render_status
    from services.orchestrator import expected_groups

    exp = cfg.experiment_id
    if experiment_given:
        if cfg.cache.url:
            render_endpoints(_endpoints_and_health(cfg, exp), console, exp)  # type: ignore[arg-type]
        else:
            console.print("[dim]set REDIS_URL to list the experiment's /metrics endpoints[/]")
    if not cfg.bus.bootstrap:
        console.print("[red]status needs a running broker: set KAFKA_BOOTSTRAP (see `autointerv infra`)[/]")
        return 2
    report = asyncio.run(collect_status(cfg.bus.bootstrap, Topics(cfg.bus.topic_prefix), expected_groups(cfg)))
    render_status(report, console, experiment=exp if experiment_given else None)
    return 0


def cmd_top(args: argparse.Namespace, cfg: Config | None, console: Console) -> int:
    from services.monitor.top import run_top

    urls: str | list[str] = args.url
    if cfg is not None:
        eps = [e for e, health in _endpoints_and_health(cfg, cfg.experiment_id) if health != "unreachable"]
        if not eps:
            console.print(f"[red]no reachable endpoint registered for {cfg.experiment_id}[/]")
            return 1
        urls = [e.metrics_url for e in eps]  # type: ignore[attr-defined]
    run_top(urls, args.refresh, once=args.once)
    return 0


def cmd_tail(args: argparse.Namespace, cfg: Config, experiment: str | None) -> int:
    from services.core.bus import Topics, client_security_kwargs
    from services.monitor.tail import physical_topic, run_tail

    if not cfg.bus.bootstrap:
        raise ConfigError("tail needs a running broker: set KAFKA_BOOTSTRAP (see `autointerv infra`)")
    topic = physical_topic(Topics(cfg.bus.topic_prefix), args.topic)
    run_tail(cfg.bus.bootstrap, topic, experiment=experiment, from_beginning=args.from_beginning, limit=args.n,
             exit_at_end=args.exit_at_end, client_kwargs=client_security_kwargs(cfg.bus))
    return 0


# --------------------------------------------------------------------------- clean, init, report


def cmd_clean(args: argparse.Namespace, cfg: Config, experiment: str, console: Console) -> int:
    """Delete one experiment's Redis state (SCAN, never KEYS) and, with --run-dir, its run directory."""
    import redis.asyncio as aioredis

    from services.core.infra import infrastructure
    from services.core.state import clean_experiment, experiment_keys

    if not re.fullmatch(SAFE_NAME, experiment):
        raise ConfigError(f"not an experiment id: {experiment!r}")

    async def go(url: str) -> list[str]:
        client = aioredis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=3)
        try:
            ns = cfg.cache.namespace
            return await (experiment_keys if args.dry_run else clean_experiment)(client, ns, experiment)
        finally:
            await client.aclose()

    # no REDIS_URL: the embedded cache of this data dir (started just for this, broker left alone)
    with infrastructure("unused:0", cfg.cache.url, Path(cfg.experiment.data_dir)) as ep:
        keys = asyncio.run(go(ep.redis_url))
    verb = "would delete" if args.dry_run else "deleted"
    console.print(f"{verb} {len(keys)} Redis keys of {experiment}", highlight=False)
    for k in keys:
        console.print(f"  {k}", style="dim", highlight=False)
    if args.run_dir:
        root = Path(cfg.experiment.run_dir).resolve()
        target = (root / experiment).resolve()
        if target.parent != root:  # SAFE_NAME already forbids this; never rmtree outside run_dir
            raise ConfigError(f"{target} is not inside {root}")
        if target.is_dir():
            if not args.dry_run:
                shutil.rmtree(target)
                latest = root / "latest"
                if latest.is_symlink() and Path(os.readlink(latest)).name == experiment:
                    latest.unlink()
            console.print(f"{verb} {target}", highlight=False)
        else:
            console.print(f"no run directory {target}", style="dim", highlight=False)
    return 0


def cmd_init(args: argparse.Namespace, console: Console) -> int:
    from services.core.starter import starter_config

    path = Path(args.path)
    if path.exists() and not args.force:
        console.print(f"[red]{path} exists; pass --force to overwrite it[/]")
        return 1
    name = args.name or re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip(".-_") or "my-experiment"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_config(name=name))
    load_config(path, environ={})  # what we write must load
    console.print(f"wrote {path} (experiment name {name!r}); check it with `autointerv config -c {path}`, "
                  f"run it with `autointerv run -c {path}`", highlight=False)
    return 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    import orjson

    from services.sink.table import load_results, render_table

    run_dir = Path(args.run_dir)
    try:
        results = load_results(run_dir)
    except FileNotFoundError:
        console.print(f"no finished run at {run_dir}: `autointerv run` writes results.jsonl there when it "
                      "finalizes (or pass a run directory: autointerv report runs/<experiment id>)",
                      highlight=False)
        return 1
    rows = results.to_dict("records") if len(results) else []
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY,
                                      default=str).decode() + "\n")
    elif args.csv:
        results.to_csv(sys.stdout, index=False)
    else:
        render_table(rows, console)
    return 0
