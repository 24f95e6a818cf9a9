"""A private service stack on loopback for scripts and tests: a redis-server and `celery -A tasks worker` processes.

    with redis_server() as redis:
        app = client_app(redis.url + "/0")
        env = worker_env(redis.url + "/0", {"POCKET_TTS_NUM_THREADS": "1"})
        with running_worker(app, env, logs / "w1.log", "w1", "-c", "2") as worker:
            worker.wait_children_ready(app)
            ...

Every process runs in its own process group, so that a worker's pool children
go with it; it counts as started only once it answers (PING for Redis,
`app.control.ping` for a worker) within a bound, and it is stopped with SIGTERM,
then SIGKILL after a bound. The context managers stop what they started even
when the caller fails. Torch-free: the workers load the model, never this process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery import Celery, group

REPO_ROOT = Path(__file__).resolve().parents[1]
REDIS_INSTALL_HINT = "Debian/Ubuntu: apt-get install redis-server"
REDIS_START_TIMEOUT = 15.0
WORKER_START_TIMEOUT = 120.0
STOP_TIMEOUT = 20.0
LOG_TAIL_CHARS = 3000


class StackError(RuntimeError):
    """A process of the stack is missing or did not start; the message says which and why."""


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (connections closed a moment ago do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_process_group(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group led by `process`, SIGKILL it if `process` is still alive after `timeout` s."""
    try:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        # Pool children of a leader that died may still be around.
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group (a worker's main process and its pool children)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            if int(fields[2]) == pgid:  # fields after "pid (comm)": state, ppid, pgrp, ...
                pids.append(int(entry.name))
    return sorted(pids)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def memory_mib(pid: int) -> dict[str, float]:
    """RSS, PSS and their shared/private split of a process, in MiB (/proc/<pid>/smaps_rollup)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0]) / 1024
    keys = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")
    return {key: round(fields[key], 1) for key in keys}


# ---------------------------------------------------------------------------
# Redis
# ---------------------------------------------------------------------------


def redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise StackError(f"redis-server is not installed ({REDIS_INSTALL_HINT})")
    return path


@dataclass
class RedisServer:
    process: subprocess.Popen
    port: int
    workdir: str
    persistent: bool = False
    password: str | None = None

    @property
    def url(self) -> str:
        """redis://127.0.0.1:<port>, without a database number."""
        return f"redis://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL the server, as a crash or an OOM kill would (with `persistent`, its data survives)."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def start(self, timeout: float = REDIS_START_TIMEOUT) -> None:
        """Start it again on the same port and folder (after `kill`)."""
        self.process = _spawn_redis(self.port, self.workdir, self.persistent, self.password)
        if not _wait_for_pong(self.process, self.port, timeout, self.password):
            stop_process_group(self.process)
            raise StackError(f"redis-server did not come back on port {self.port} within {timeout:g} s")


def _spawn_redis(port: int, workdir: str, persistent: bool, password: str | None = None) -> subprocess.Popen:
    # persistent: every write is in the append-only file before Redis answers, as a production
    # setup that must not lose queued jobs would run it.
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    auth = ["--requirepass", password] if password else []
    return subprocess.Popen(
        [redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "", *persistence, *auth]
        + ["--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


@contextmanager
def redis_server(
    timeout: float = REDIS_START_TIMEOUT, persistent: bool = False, port: int | None = None, password: str | None = None
) -> Iterator[RedisServer]:
    """A redis-server on 127.0.0.1 and `port` (default: a free one) in its own temporary folder
    (append-only file if `persistent`; clients must authenticate with `password` if given)."""
    redis_binary()
    if port and not port_is_free(port):  # another server there would answer our PING
        raise StackError(f"port {port} on 127.0.0.1 is in use: choose another one")
    with tempfile.TemporaryDirectory(prefix="pocket-tts-redis-") as workdir:
        server = None
        try:
            # Another process may take a free port before redis binds it: try another; a given port is tried once.
            for port in [port] if port else (free_port() for _ in range(3)):
                process = _spawn_redis(port, workdir, persistent, password)
                server = RedisServer(process, port, workdir, persistent, password)
                if _wait_for_pong(server.process, server.port, timeout, password):
                    break
                stop_process_group(server.process)
            else:
                raise StackError(f"redis-server on 127.0.0.1 did not answer PING within {timeout:g} s (port {port})")
            yield server
        finally:
            if server is not None:
                stop_process_group(server.process, timeout=10)


def _wait_for_pong(process: subprocess.Popen, port: int, timeout: float, password: str | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall((f"AUTH {password}\r\n" if password else "").encode() + b"PING\r\n")
                if b"+PONG" in conn.recv(64):
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------


def client_app(broker_url: str, result_backend: str | None = None) -> Celery:
    """A web app's view of the service: plain Celery, JSON only, tasks sent by name."""
    app = Celery("pocket-tts-client", broker=broker_url, backend=result_backend or broker_url)
    app.conf.update(
        accept_content=["json"], result_accept_content=["json"], task_serializer="json", result_serializer="json"
    )
    return app


def worker_env(
    broker_url: str, settings: Mapping[str, str], inherit_settings: bool = False, python_path: Sequence[Path] = ()
) -> dict[str, str]:
    """A worker's environment: this process's, the broker, `settings`, and this repository on PYTHONPATH.

    This process's POCKET_TTS_* settings are dropped unless `inherit_settings`;
    its CELERY_* settings always are (the stack has its own broker).
    """
    dropped = ("CELERY_",) if inherit_settings else ("CELERY_", "POCKET_TTS_")
    env = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    paths = [str(REPO_ROOT), *map(str, python_path), os.environ.get("PYTHONPATH")]
    env.update(CELERY_BROKER_URL=broker_url, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    return {**env, **settings}


@dataclass
class Worker:
    """One `celery -A tasks worker` subprocess, leader of its own process group."""

    process: subprocess.Popen
    node: str  # Celery node name, <name>@<host>
    log: Path
    queue: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.output()[-chars:]

    def wait_ready(self, app: Celery, timeout: float = WORKER_START_TIMEOUT) -> None:
        """Return once the worker answers a ping; raise StackError if it exits or the bound passes."""
        deadline = time.monotonic() + timeout
        while not self._answers_ping(app):
            if self.process.poll() is not None:
                raise StackError(f"worker {self.node} exited with code {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise StackError(f"worker {self.node} did not answer within {timeout:g} s:\n{self.log_tail()}")

    def _answers_ping(self, app: Celery) -> bool:
        try:
            return bool(app.control.ping(destination=[self.node], timeout=0.5))
        except app.connection_for_write().connection_errors:  # a pooled connection from before a Redis restart
            return False

    def child_pids(self, app: Celery) -> list[int]:
        """The processes that run jobs: the prefork pool's children, or the main process of a threads pool."""
        stats = app.control.inspect(destination=[self.node], timeout=5).stats() or {}
        if self.node not in stats:
            raise StackError(f"worker {self.node} did not answer inspect stats")
        return stats[self.node]["pool"].get("processes") or [self.pid]

    def wait_children_ready(self, app: Celery, timeout: float = WORKER_START_TIMEOUT) -> dict[int, dict]:
        """`pocket_tts.worker_info` of every process that runs jobs, once each has loaded its model."""
        info = app.signature("pocket_tts.worker_info", options={"queue": self.queue})
        deadline = time.monotonic() + timeout
        seen: dict[int, dict] = {}
        while True:
            children = set(self.child_pids(app))
            if children <= {pid for pid, report in seen.items() if report["ready"]}:
                return {pid: seen[pid] for pid in children}
            if time.monotonic() > deadline:
                raise StackError(f"children {children} of {self.node} not ready; reports: {seen}\n{self.log_tail()}")
            # A group, so that the pool hands them to several idle children at once.
            for report in group(info.clone() for _ in range(4 * len(children))).apply_async().get(timeout=timeout):
                seen[report["pid"]] = report

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop_process_group(self.process, timeout)


def start_worker(
    env: Mapping[str, str], log: Path, name: str, *args: str, queue: str = "celery", pool: str = "prefork"
) -> Worker:
    """Start a worker consuming `queue` without waiting for it; `args` go to `celery worker` last."""
    command = [sys.executable, "-m", "celery", "-A", "tasks", "worker", f"--pool={pool}", "-n", f"{name}@%h"]
    command += ["-Q", queue, "--loglevel=INFO", "--without-mingle", "--without-gossip", *args]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Worker(process, f"{name}@{socket.gethostname()}", log, queue)


@contextmanager
def running_worker(
    app: Celery,
    env: Mapping[str, str],
    log: Path,
    name: str,
    *args: str,
    queue: str = "celery",
    pool: str = "prefork",
    timeout: float = WORKER_START_TIMEOUT,
) -> Iterator[Worker]:
    """A started worker that answers pings; stopped on exit."""
    worker = start_worker(env, log, name, *args, queue=queue, pool=pool)
    try:
        worker.wait_ready(app, timeout)
        yield worker
    finally:
        worker.stop()


# ---------------------------------------------------------------------------
# Gateway
# ---------------------------------------------------------------------------


@dataclass
class Gateway:
    """One `python -m gateway` subprocess (the HTTP API), leader of its own process group."""

    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@contextmanager
def running_gateway(env: Mapping[str, str], log: Path, *args: str, timeout: float = 30.0) -> Iterator[Gateway]:
    """A gateway on 127.0.0.1 and a free port that answers GET /health (any status); stopped on exit."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--port", str(port), *args],
            cwd=REPO_ROOT,
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    gateway = Gateway(process, port, log)
    try:
        _wait_for_http(gateway, timeout)
        yield gateway
    finally:
        stop_process_group(process)


def _wait_for_http(gateway: Gateway, timeout: float) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{gateway.url}/health", timeout=5).close()
            return
        except urllib.error.HTTPError:  # answered, e.g. 503 while no worker is up
            return
        except OSError:
            if gateway.process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"gateway did not answer within {timeout:g} s:\n{gateway.log_tail()}") from None
            time.sleep(0.1)
