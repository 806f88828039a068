"""A throwaway PostgreSQL cluster for tests (and the server benchmark): the real server, started per session.

Fixtures:

* ``postgres_url`` (session): ``initdb`` a cluster in a temporary directory, start it on a free port (TCP on
  127.0.0.1, the Unix socket inside the temporary directory), create a database and yield its SQLAlchemy URL
  (``postgresql+psycopg://...``). The cluster is stopped and deleted at teardown.
* ``db_url`` (function, parametrized ``sqlite`` / ``postgresql``): an *empty* database per test, so the same
  test runs against both engines. For PostgreSQL each test gets its own freshly created database.

``initdb`` and ``pg_ctl`` refuse to run as root; as root they run as the ``postgres`` user through
``runuser -u postgres --`` and the data directory is handed to that user. Without the server binaries the
fixtures skip (``apt-get install postgresql``), or fail when ``CI`` is set: CI must not silently test less.

:class:`PostgresCluster` is the plain context manager behind the fixture (the benchmark uses it too).
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.required import unavailable

__all__ = ["PostgresCluster", "PostgresUnavailable", "db_url", "find_pg_bin", "postgres_url"]

_SEARCH = ("/usr/lib/postgresql/*/bin", "/usr/local/pgsql/bin", "/opt/homebrew/opt/postgresql*/bin")


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed."""


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl`` (newest version first), else raise."""
    candidates = sorted((Path(p) for pattern in _SEARCH for p in glob.glob(pattern)), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for d in candidates:
        if (d / "initdb").exists() and (d / "pg_ctl").exists():
            return d
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresCluster:
    """A throwaway cluster: ``with PostgresCluster() as pg: engine = create_engine(pg.url("mydb"))``.

    ``durable=False`` (tests) turns off fsync and synchronous commit: faster, and a test cluster need not
    survive power loss. The benchmark uses ``durable=True`` so its figures mean something.
    """

    def __init__(self, *, durable: bool = False, user: str = "postgres") -> None:
        self.bin = find_pg_bin()
        self.durable = durable
        self.user = user
        self.port = 0
        self.root: Path | None = None
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> PostgresCluster:
        self.root = Path(tempfile.mkdtemp(prefix="pg-", dir="/tmp"))  # short: the socket path has a limit
        data, sock = self.root / "data", self.root / "sock"
        sock.mkdir()
        if self._as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
            shutil.chown(sock, "postgres", "postgres")
        self._run("initdb", "-D", str(data), "-U", self.user, "--auth=trust", "--encoding=UTF8",
                  "--locale=C", "--no-instructions")
        self.port = _free_port()
        opts = [f"-p {self.port}", f"-k {sock}", "-c listen_addresses=127.0.0.1", "-c max_connections=200"]
        if not self.durable:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run("pg_ctl", "-D", str(data), "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "-o", " ".join(opts), "start")
        return self

    def stop(self) -> None:
        if self.root is None:
            return
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` on this cluster (psycopg 3 driver, TCP on 127.0.0.1)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database and return its URL."""
        import psycopg

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A running throwaway cluster for the whole session (skipped, or failed on CI, without PostgreSQL)."""
    try:
        cluster = PostgresCluster()
    except PostgresUnavailable as exc:
        unavailable(str(exc))
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def postgres_url(postgres_cluster: PostgresCluster) -> str:
    """URL of a database created once per session on the throwaway cluster."""
    return postgres_cluster.create_database("fleet_test")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database per test: a SQLite file, or a fresh database on the throwaway PostgreSQL cluster."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = cluster.create_database(name)
    yield url
    with contextlib.suppress(Exception):
        cluster.drop_database(name)
