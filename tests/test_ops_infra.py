"""`autointerv infra`: a password on the embedded Valkey (generated per data dir, 0600, reused),
never in a log line, and SIGTERM stops Tansu and Valkey instead of orphaning them.  Also the
start-up eviction-policy check, against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from services.core.checks import eviction_problems, redis_eviction_problems, warn_about_redis
from services.core.infra import EmbeddedCache
from services.core.logs import setup_logging

ROOT = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _start_infra(data_dir: Path, log: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("KAFKA_BOOTSTRAP", None)
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "--log-level", "INFO", "infra",
                             "--set", f"experiment.data_dir={data_dir}"], cwd=data_dir.parent, env=env,
                            stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
    exports: dict[str, str] = {}
    assert proc.stdout is not None
    while len(exports) < 2:
        line = proc.stdout.readline()
        assert line, f"infra exited early: {log.read_text()}"
        m = re.match(r"export (\w+)=(\S+)", line.strip())
        if m:
            exports[m.group(1)] = m.group(2)
    return proc, exports


@pytest.mark.slow
def test_infra_password_and_sigterm_stops_both_servers(tmp_path):
    data_dir = tmp_path / "data"
    proc, env = _start_infra(data_dir, tmp_path / "infra1.log")
    try:
        url = env["REDIS_URL"]
        password = (data_dir / "valkey" / "password").read_text().strip()
        assert len(password) >= 24 and f":{password}@" in url
        assert stat.S_IMODE((data_dir / "valkey" / "password").stat().st_mode) == 0o600
        assert stat.S_IMODE((data_dir / "valkey").stat().st_mode) == 0o700
        client = redis.Redis.from_url(url)
        client.set("k", "v")
        port = client.connection_pool.connection_kwargs["port"]
        anonymous = redis.Redis(port=port)
        assert anonymous.ping()  # the readiness probe may PING, nothing else
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.get("k")
        broker_port = int(env["KAFKA_BOOTSTRAP"].rsplit(":", 1)[1])
        children = _children(proc.pid)
        assert len(children) >= 2 and _listening(broker_port) and _listening(port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (any(map(_alive, children)) or _listening(broker_port)):
            time.sleep(0.2)
        assert not any(map(_alive, children)), "Tansu or Valkey outlived `autointerv infra`"
        assert not _listening(broker_port) and not _listening(port)
    finally:
        if proc.poll() is None:
            proc.kill()
    log_text = (tmp_path / "infra1.log").read_text()
    assert "embedded cache started" in log_text and password not in log_text
    # a restart reuses the data dir's password, so the data (AOF) and the URL handed out stay valid
    proc, env2 = _start_infra(data_dir, tmp_path / "infra2.log")
    try:
        assert f":{password}@" in env2["REDIS_URL"]
        assert redis.Redis.from_url(env2["REDIS_URL"]).get("k") == b"v"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_urls_with_passwords_never_reach_a_log_line():
    buf = io.StringIO()
    setup_logging("INFO", stream=buf)
    log = logging.getLogger("autointerv.test")
    secret = "s3cr3t-Pw_x"
    url = f"redis://autointerv:{secret}@127.0.0.1:6400/0"
    log.info("connecting to %s", url, extra={"target": url, "nested": {"u": url}})
    try:
        raise ConnectionError(f"cannot reach {url}")
    except ConnectionError:
        log.exception("failed")
    out = buf.getvalue()
    assert secret not in out and out.count("redis://autointerv:***@127.0.0.1:6400/0") >= 4
    log.info("plain", extra={"a": "http://host:8080/x", "b": "user@example.org"})
    assert "http://host:8080/x" in buf.getvalue() and "user@example.org" in buf.getvalue()


@pytest.mark.parametrize(("policy", "maxmemory", "says"), [
    ("noeviction", 0, "never evicts"),
    ("noeviction", 1 << 30, "refuses writes"),
    ("allkeys-lru", 1 << 30, "clusterer snapshot"),
    ("allkeys-lfu", 0, "any key"),
    ("volatile-random", 1 << 30, "at random"),
    ("volatile-lru", 0, "no maxmemory"),
])
def test_bad_eviction_setups_are_explained(policy, maxmemory, says):
    [problem] = eviction_problems(policy, maxmemory)
    assert says in problem and "volatile-lru" in problem


def test_good_eviction_setups_pass():
    assert eviction_problems("volatile-lru", 1 << 30) == eviction_problems("volatile-lfu", 1 << 30) == []


async def test_eviction_check_reads_real_servers(tmp_path):
    machine = aioredis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1)
    try:
        info = await machine.info("memory")
    except (redis.exceptions.ConnectionError, OSError):
        info = None
    finally:
        await machine.aclose()
    if info is not None and info.get("maxmemory_policy") == "noeviction" and not info.get("maxmemory"):
        problems = await warn_about_redis("redis://127.0.0.1:6379/0")  # this machine's Redis, as found
        assert len(problems) == 1 and "never evicts" in problems[0]
    with EmbeddedCache(tmp_path / "valkey") as cache:
        client = aioredis.Redis.from_url(cache.url)
        try:
            assert "no maxmemory" in (await redis_eviction_problems(client))[0]
            await client.config_set("maxmemory", str(256 << 20))
            assert await redis_eviction_problems(client) == []
            await client.config_set("maxmemory-policy", "allkeys-lru")
            assert "any key" in (await redis_eviction_problems(client))[0]
        finally:
            await client.aclose()


def test_unreachable_redis_is_not_a_start_up_failure():
    assert asyncio.run(warn_about_redis("redis://127.0.0.1:1/0")) == []


def test_a_relative_data_dir_works(tmp_path, monkeypatch):
    """`.data` is the default data dir, relative to where `autointerv run` is started."""
    monkeypatch.chdir(tmp_path)
    with EmbeddedCache(Path(".data") / "valkey") as cache:
        client = redis.Redis.from_url(cache.url)
        assert client.set("k", "v") and client.get("k") == b"v"
