"""A real PostgreSQL server for tests and benchmarks: Debian's `postgresql` package, on loopback, in a
temporary data folder, stopped and deleted on exit. TCP connections need a password (scram-sha-256), so
clients take it from PGPASSWORD as they would in production; the Unix socket (in the data folder) trusts
the local superuser, for creating databases.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Self

PASSWORD = "prefsynth-test-password"
USER = "postgres"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """`with PostgresServer() as pg:` a server on 127.0.0.1:`pg.port`; `pg.create_db(name)` makes a database."""

    def __init__(self) -> None:
        found = bin_dir()
        if found is None:
            raise RuntimeError("PostgreSQL is not installed: apt-get install postgresql (`make test` does)")
        self.bin, self.port = found, _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="prefsynth-pg-"))
        self.data = self.root / "data"
        # initdb and postgres refuse to run as root: as root, the server runs as the postgres user
        self.as_user = ["runuser", "-u", USER, "--"] if os.geteuid() == 0 else []
        if self.as_user:
            os.chown(self.root, pwd.getpwnam(USER).pw_uid, -1)

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=120)

    def __enter__(self) -> Self:
        (pwfile := self.root / "pw").write_text(PASSWORD)
        if self.as_user:
            os.chown(pwfile, pwd.getpwnam(USER).pw_uid, -1)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}",
                  "--auth-host=scram-sha-256", "--auth-local=trust")  # fmt: skip
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-t", "60",
                      "-o", f"-k {self.root} -p {self.port} -h 127.0.0.1 -c fsync=off", "start")  # fmt: skip
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_db(self, name: str) -> str:
        """A new database; returns its warehouse name without a data path."""
        self._run(str(self.bin / "createdb"), "-h", str(self.root), "-p", str(self.port), "-U", USER, name)
        return f"ducklake:postgres://{USER}@127.0.0.1:{self.port}/{name}"
