"""Fault drill: the operator's and the attacker's tests of issue 12, redone as one command.

Each scenario runs ``autointerv run`` as its own process (sim pair, hashing embedder, a fresh data
directory), injures it, and prints what happened:

* ``broker``: the embedded broker is killed (SIGKILL) mid-run.  Seconds until the process exits,
  its exit code, how fast its log grew meanwhile, and what summary.json says.
* ``redis``: the cache (an external Valkey the drill owns) stops for 10 s mid-run and comes back.
  Texts generated against ``controller.max_texts``, and whether the run finished.
* ``sigterm``: SIGTERM mid-run.  Seconds to exit; summary.json's ``stopped_because``.
* ``poison``: undecodable texts, embeddings with NaN / short / non-base64 vectors and forged
  hypotheses are written onto the run's topics while it runs (the drill owns the broker).  How many
  were dead-lettered, how many forged hypotheses became findings, and whether the run finished.
* ``rerun``: the same config twice on one data directory: the second run's embedding-cache hit rate.
* ``scale``: 20,000 texts: wall time, texts/s and the process's peak resident memory.

    .venv/bin/python bench/faults.py [--only broker,redis,...] [--keep DIR]

The last line is ``faults_survived=<scenarios that behaved / scenarios run>``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.core.bus import Producer, Topics  # noqa: E402
from services.core.config import load_config  # noqa: E402
from services.core.events import EmbeddedText, Hypothesis, TextRef  # noqa: E402
from services.core.infra import EmbeddedBroker, EmbeddedCache  # noqa: E402


@dataclass
class Outcome:
    name: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)


def _config(work: Path, exp: str, **over: Any) -> Path:
    cfg: dict[str, Any] = {
        "experiment": {"id": exp, "name": exp, "run_dir": str(work / "runs"), "data_dir": str(work / "data")},
        "observability": {"metrics_port": None, "progress": True},
        "models": {"base": {"backend": "sim"}, "intervention": {"backend": "sim"}},
        "embedder": {"backend": "hashing"},
        "controller": {"max_texts": 400_000, "round_texts": 2000, "stop_when_stable": False},
    }
    for section, values in over.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = work / f"{exp}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _start(work: Path, config: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log = work / "stdout.log"
    base = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "REDIS_URL")}
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "--log-level", "WARNING", "run", "--config",
                             str(config)], cwd=work, env={**base, "PYTHONPATH": str(ROOT), **(env or {})},
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    return proc, log


def _wait(cond: Callable[[], bool], timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.25)
    return False


def _rounds(run_dir: Path) -> int:
    log = run_dir / "autointerv.log"
    return log.read_bytes().count(b"round planned") if log.exists() else 0


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return orjson.loads(path.read_bytes()) if path.exists() else {}


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the process's children, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                out.append((int(stat.parent.name), cmd))
        except (OSError, IndexError, ValueError):
            continue
    return out


def _peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _exit_within(proc: subprocess.Popen[bytes], timeout_s: float) -> float | None:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=timeout_s)
        return time.monotonic() - t0
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


# --------------------------------------------------------------------------- scenarios


def broker(work: Path) -> Outcome:
    exp = "drill-broker"
    proc, log = _start(work, _config(work, exp, bus={"broker_loss_s": 20}))
    run_dir = work / "runs" / exp
    _wait(lambda: _rounds(run_dir) >= 2, 180, proc)
    tansu = [pid for pid, cmd in _children(proc.pid) if "tansu" in cmd]
    os.kill(tansu[0], signal.SIGKILL)
    size0, t0 = log.stat().st_size, time.monotonic()
    took = _exit_within(proc, 180)
    grew = (log.stat().st_size - size0) / max(1e-9, time.monotonic() - t0)
    s = _summary(run_dir)
    ok = took is not None and s.get("complete") is False and s.get("stopped_because") != "budget"
    return Outcome("broker", ok, {"exit_after_kill_s": None if took is None else round(took, 1),
                                  "exit_code": proc.returncode, "log_bytes_per_s": round(grew),
                                  "stopped_because": s.get("stopped_because"), "complete": s.get("complete"),
                                  "texts": (s.get("texts") or {}).get("total")})


def redis(work: Path) -> Outcome:
    exp = "drill-redis"
    cache = EmbeddedCache(work / "valkey").start()
    port = cache.port
    budget = 12_000
    proc, _ = _start(work, _config(work, exp, controller={"max_texts": budget, "round_texts": 1000}),
                     env={"REDIS_URL": cache.url})
    run_dir = work / "runs" / exp
    try:
        _wait(lambda: _rounds(run_dir) >= 3, 180, proc)
        cache.stop()
        time.sleep(10)
        cache = EmbeddedCache(work / "valkey", port=port).start()
        took = _exit_within(proc, 600)
    finally:
        cache.stop()
    s = _summary(run_dir)
    texts = (s.get("texts") or {}).get("total", 0)
    ok = took is not None and s.get("complete") is True and texts <= budget
    return Outcome("redis", ok, {"outage_s": 10, "texts": texts, "max_texts": budget,
                                 "stopped_because": s.get("stopped_because"), "finished": took is not None})


def sigterm(work: Path) -> Outcome:
    exp = "drill-sigterm"
    proc, _ = _start(work, _config(work, exp))
    run_dir = work / "runs" / exp
    _wait(lambda: _rounds(run_dir) >= 2, 180, proc)
    proc.send_signal(signal.SIGTERM)
    took = _exit_within(proc, 120)
    s = _summary(run_dir)
    ok = took is not None and took < 10 + 8 and s.get("stopped_because") == "signal"  # drain bound: 8 s
    return Outcome("sigterm", ok, {"exit_after_sigterm_s": None if took is None else round(took, 1),
                                   "stopped_because": s.get("stopped_because"), "complete": s.get("complete")})


async def _inject(bootstrap: str, prefix: str, exp: str, n: int) -> dict[str, int]:
    cfg = load_config(None, environ={}, overrides={"bus": {"topic_prefix": prefix}})
    topics = Topics(prefix)
    prod = Producer(cfg.bus, bootstrap, topics, "drill")
    await prod.start()
    try:
        for i in range(n):  # undecodable texts
            await prod.send_raw(topics.name("texts"), b"\xff not json " + str(i).encode(), key=b"x")
        good = base64.b64encode(bytes(384 * 2)).decode()
        for i in range(n):  # embeddings whose vectors are poison
            bad = [("vector_b64", good[: len(good) // 2]), ("vector_b64", "!!not base64!!"),
                   ("vector_b64", base64.b64encode(b"\x00\x7e" * 384).decode())][i % 3]  # short, bad, NaN
            body = {"experiment_id": exp, "text_id": f"poison-{i}", "role": "base", "prompt_id": "p", "text": "x",
                    "embedding_model": "hashing", "dim": 384, "vector_b64": good, bad[0]: bad[1]}
            await prod.send_raw(topics.name(EmbeddedText.topic), orjson.dumps(body), key=exp.encode())
        for i in range(n):  # forged findings: claimed words planted in "held-out" texts that never existed
            fake = [TextRef(text_id=f"forged-{i}-{j}", prompt_id="p", role="intervention" if j % 2 else "base",
                            text="a tiny purple dragon" if j % 2 else "nothing") for j in range(60)]
            await prod.send(Hypothesis(experiment_id=exp, hypothesis_id=f"forged-{i}", candidate_id="forged",
                                       cluster_id=0, direction="intervention", labeler="attacker",
                                       text="The intervention model writes about a tiny purple dragon.",
                                       keywords=["dragon"], label_text_ids=[], holdout_texts=fake))
        await prod.flush()
    finally:
        await prod.stop()
    return {"undecodable_texts": n, "poison_embeddings": n, "forged_hypotheses": n}


def poison(work: Path) -> Outcome:
    exp = "drill-poison"
    n = 100
    with EmbeddedBroker(log_path=work / "tansu.log") as brk:
        prefix = "drill"
        config = _config(work, exp, bus={"bootstrap": brk.bootstrap, "topic_prefix": prefix},
                         controller={"max_texts": 8000, "round_texts": 1000})
        proc, _ = _start(work, config)
        run_dir = work / "runs" / exp
        _wait(lambda: _rounds(run_dir) >= 2, 180, proc)
        sent = asyncio.run(_inject(brk.bootstrap, prefix, exp, n))
        took = _exit_within(proc, 600)
    s = _summary(run_dir)
    rows = [orjson.loads(line) for line in (run_dir / "results.jsonl").read_bytes().splitlines() if line.strip()] \
        if (run_dir / "results.jsonl").exists() else []
    forged_found = sum(1 for r in rows if str(r.get("hypothesis_id", "")).startswith("forged")
                       and r.get("decision") == "validated")
    dead = (s.get("dead_letters") or {}).get("by_topic", {})
    ok = took is not None and s.get("complete") is True and forged_found == 0 \
        and dead.get("texts", 0) >= n and dead.get("embeddings", 0) >= n
    return Outcome("poison", ok, {**sent, "dead_letters": dead, "forged_validated": forged_found,
                                  "finished": s.get("stopped_because"), "texts": (s.get("texts") or {}).get("total")})


def rerun(work: Path) -> Outcome:
    rates = []
    for i in range(2):
        exp = f"drill-rerun-{i}"
        cfg = _config(work, exp, experiment={"name": "drill-rerun"}, cache={"enabled": True},
                      controller={"max_texts": 4000, "round_texts": 400})
        proc, _ = _start(work, cfg)
        _exit_within(proc, 600)
        rates.append((_summary(work / "runs" / exp).get("embeddings") or {}).get("cache_hit_rate"))
    ok = rates[1] is not None and rates[1] >= 0.95
    return Outcome("rerun", ok, {"hit_rate_first": rates[0], "hit_rate_second": rates[1]})


def scale(work: Path) -> Outcome:
    exp = "drill-scale"
    proc, _ = _start(work, _config(work, exp, controller={"max_texts": 20_000, "round_texts": 2000}))
    t0, peak = time.monotonic(), 0.0
    while proc.poll() is None:
        peak = max(peak, _peak_rss_mb(proc.pid))
        time.sleep(1)
    wall = time.monotonic() - t0
    s = _summary(work / "runs" / exp)
    texts = (s.get("texts") or {}).get("total", 0)
    return Outcome("scale", texts == 20_000 and s.get("complete") is True,
                   {"texts": texts, "wall_s": round(wall, 1), "texts_per_s": round(texts / wall, 1),
                    "peak_rss_mb": round(peak)})


SCENARIOS: dict[str, Callable[[Path], Outcome]] = {"broker": broker, "redis": redis, "sigterm": sigterm,
                                                   "poison": poison, "rerun": rerun, "scale": scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(SCENARIOS))
    ap.add_argument("--keep", help="keep the scenarios' directories under this path")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="autointerv-drill-"))
    results = []
    for name in args.only.split(","):
        work = root / name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        out = SCENARIOS[name](work)
        results.append(out)
        print(f"{name:8s} {'ok  ' if out.ok else 'FAIL'} {time.monotonic() - t0:6.0f}s  "
              f"{orjson.dumps(out.figures, default=str).decode()}", flush=True)
    print(f"faults_survived={sum(r.ok for r in results)}/{len(results)}")


if __name__ == "__main__":
    main()
