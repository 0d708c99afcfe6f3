"""The integration suite's real parts: a Redis, the ChurnZero sandbox, ingest and a
Celery worker, each a real process. The suite starts a redis-server of its own on a free
port (another application's data on a shared host is never touched, and two checkouts test
side by side); RELAY_TEST_REDIS_URL names a given Redis instead. Its database is flushed
before each test. The sandbox is shared by the session and reset between tests; the worker and
ingest process of the `relay_url` fixture by a module's tests, while each test's work is done
when it ends (SharedRelay); the others are started by the test that needs them.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, Self

import pytest
import redis
import requests

from tests import procs
from tests.conftest import IN_CI, ROOT
from tests.procs import Proc, free_port, start_redis

if TYPE_CHECKING:
    from relay.delivery.batch import Delivery

GIVEN_REDIS = os.environ.get("RELAY_TEST_REDIS_URL", "")
SECRET = "test-webhook-secret"
WRITE_KEY = "test-write-key"
APP_KEY = "test-app-key"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server started for the session, or the one RELAY_TEST_REDIS_URL names."""
    if GIVEN_REDIS:
        yield GIVEN_REDIS
        return
    port = free_port()
    proc = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test database, emptied before the test and after."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def wait_for(predicate: Callable[[], bool], timeout: float = 20) -> None:
    """Wait until `predicate` holds: progress, never a fixed sleep, decides a test."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def settled(r: redis.Redis) -> bool:
    """Nothing queued, in flight or delayed."""
    return (
        r.llen("relay") == 0 and r.llen("relay.replay") == 0 and r.hlen("unacked") == 0
        and r.zcard("relay:delayed") == 0
    )  # fmt: skip


# The relay's settings in every process a test starts: test credentials, fast retries.
TEST_SETTINGS: dict[str, Any] = {
    "webhook_secret": SECRET,
    "write_keys": WRITE_KEY,
    "churnzero_app_key": APP_KEY,
    "backoff_base_s": 0.2,
    "backoff_cap_s": 2,
    "identity_wait_s": 4,
    "outage_threshold": 3,
    # One process per `relay serve` (the default is one per core): a test that kills
    # ingest kills the process that holds the requests. test_supervise runs several.
    "ingest_processes": 1,
    # Nothing recorded for the flight recorder unless a test turns it on (with an archive
    # of its own): no archiver runs beside these processes to drain the records.
    "archive": False,
}


def relay_env(redis_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a relay process: test Redis, test credentials, fast retries."""
    return procs.relay_env(redis_url, **{**TEST_SETTINGS, **settings})


class Sandbox:
    """The ChurnZero sandbox, reached over HTTP."""

    def __init__(self, url: str) -> None:
        self.url = url

    def commands(self) -> list[dict[str, Any]]:
        return list(requests.get(self.url + "/_sandbox/commands", timeout=5).json())

    def requests_log(self) -> list[dict[str, Any]]:
        return list(requests.get(self.url + "/_sandbox/requests", timeout=5).json())

    def fault(self, **fault: Any) -> None:
        requests.post(self.url + "/_sandbox/faults", json=fault, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        """ChurnZero is back: no more faults (what it received stays)."""
        requests.delete(self.url + "/_sandbox/faults", timeout=5).raise_for_status()

    def answered(self, status: int) -> bool:
        """Whether a request to /i has been answered with `status` (0: dropped)."""
        return any(x["status"] == status for x in self.requests_log())

    def reset(self) -> None:
        requests.delete(self.url + "/_sandbox/faults", timeout=5)
        requests.delete(self.url + "/_sandbox/commands", timeout=5)

    def wait_commands(self, count: int, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait until at least `count` commands arrived; return them all."""
        deadline = time.monotonic() + timeout
        found = self.commands()
        while len(found) < count and time.monotonic() < deadline:
            time.sleep(0.1)
            found = self.commands()
        return found


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox server process for the session."""
    children = procs.Children(tmp_path_factory.mktemp("logs"))
    try:
        yield Sandbox(procs.start_sandbox(children).url)
    finally:
        children.stop_all()


@pytest.fixture
def clean_sandbox(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The sandbox with no commands and no faults, before and after the test."""
    sandbox.reset()
    yield sandbox
    sandbox.reset()


Starter = Callable[..., Proc]


@pytest.fixture
def start_worker(redis_url: str, sandbox: Sandbox, tmp_path: Path) -> Iterator[Starter]:
    """Start Celery worker processes (stopped after the test)."""
    children = procs.Children(tmp_path)

    def start(*, concurrency: int = 4, wait_ready: bool = True, **settings: Any) -> Proc:
        settings.setdefault("churnzero_url", sandbox.url + "/i")
        env = relay_env(settings.pop("redis_url", redis_url), **settings)
        n = len(children.procs)
        proc = procs.start_worker(
            children, env, f"w{n}-{os.getpid()}", label=f"worker{n}", concurrency=concurrency
        )
        # Consuming before the test goes on: a test's faults and ages run from its next
        # step, however long a worker takes to start on this machine.
        if wait_ready:
            wait_for(lambda: " ready." in proc.log.read_text(errors="replace") or proc.exited(), 60)
            proc.check_alive()
        return proc

    yield start
    children.stop_all()


@pytest.fixture
def start_ingest(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Start ingest processes; returns each one's base URL."""
    children = procs.Children(tmp_path)

    def start(**settings: Any) -> str:
        env = relay_env(settings.pop("redis_url", redis_url), **settings)
        return procs.start_ingest(children, env, f"ingest{len(children.procs)}").url

    yield start
    children.stop_all()


OwnRedis = Callable[..., tuple[str, redis.Redis]]


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """Start redis-servers of the test's own, with these extra arguments (to kill one, cut
    its clients, fill it, or measure its memory whole); each gives the URL of its
    database 0 and a client of it. Stopped after the test."""
    servers: list[subprocess.Popen[bytes]] = []
    clients: list[redis.Redis] = []

    def start(*extra: str, port: int | None = None) -> tuple[str, redis.Redis]:
        port = port or free_port()
        servers.append(start_redis(port, tmp_path / f"redis{port}", *extra))
        url = f"redis://127.0.0.1:{port}/0"
        clients.append(redis.Redis.from_url(url))
        return url, clients[-1]

    yield start
    for client in clients:
        client.close()
    for server in servers:
        if server.poll() is None:
            server.terminate()
            server.wait(10)


def url_of(r: redis.Redis) -> str:
    """The URL of the Redis database a client talks to (for child processes)."""
    kw = r.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw['db']}"


def queued_items(r: redis.Redis, queue: str = "relay") -> list[dict[str, Any]]:
    """Every item waiting in a Celery queue (`relay`, or the replay lane's `relay.replay`),
    oldest first (read-only peek)."""
    import json

    from relay import wire

    out = []
    for raw in reversed(r.lrange(queue, 0, -1)):
        frame = json.loads(raw)
        assert frame["headers"]["task"] == "relay.deliver_batch"
        out.extend(wire.items_of(frame))
    return out


def sign(body: bytes) -> str:
    """The X-Signature Segment would send for this body."""
    from relay.ingest.auth import signature

    return signature(SECRET, body)


def cut_all(conns: list[Any]) -> None:
    """Shut down and close these sockets, as a network cut would."""
    import socket

    for s in conns:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
            s.close()


class Senders:
    """Threads sending load, started together and stopped together. A subclass gives its
    threads to `__init__` and watches `self._stop`."""

    def __init__(self, threads: list[Any]) -> None:
        import threading

        self._threads = threads
        self._stop = threading.Event()

    def start(self) -> Self:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 120) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)


class Blip:
    """A TCP proxy in front of a Redis that can drop every connection and refuse new ones
    for a while: a network blip between a relay process and its broker."""

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def refuse(self) -> None:
        """Drop every connection now and refuse new ones until `admit`."""
        self._open.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        cut_all(conns)

    def admit(self) -> None:
        """Let new connections through again."""
        self._open.set()

    def cut(self, seconds: float) -> None:
        """Drop every connection now, refuse new ones for `seconds`, then let them in."""
        self.refuse()
        time.sleep(seconds)  # the blip's length is the fault itself, not a wait for progress
        self.admit()

    def close(self) -> None:
        self._stop = True
        self._listener.close()
        self.cut(0)


# --- the middle layer in-process -------------------------------------------------------


def event_item(rid: str, **event: Any) -> dict[str, Any]:
    """A queued item as ingest writes it: a track named `rid` of a user with ChurnZero ids."""
    ids = {"accountExternalId": "A", "contactExternalId": "C"}
    body = {"type": "track", "userId": "u", "event": rid, "timestamp": "2026-11-29T10:00:00Z",
            "properties": ids, **event}  # fmt: skip
    return {"id": rid, "source": "api", "received_at": time.time(), "attempts": 0, "event": body}


def delayed_items(r: redis.Redis) -> list[dict[str, Any]]:
    """Every item waiting in the delayed set for its next try."""
    from relay import wire

    return [i for m in r.zrange("relay:delayed", 0, -1) for i in wire.unpack(m)["items"]]


@pytest.fixture
def make_delivery(r: redis.Redis, clean_sandbox: Sandbox) -> Iterator[Callable[..., Delivery]]:
    """A worker thread's Delivery on the test database, sending to the sandbox (with these
    settings); closed after the test."""
    from relay.delivery.batch import Delivery
    from relay.mapping import load_mapping
    from relay.settings import Settings

    made: list[Delivery] = []

    def make(**settings: Any) -> Delivery:
        settings = {"churnzero_url": clean_sandbox.url + "/i", "churnzero_app_key": APP_KEY,
                    **settings}  # fmt: skip
        made.append(Delivery(Settings(**settings), r, load_mapping(None)))
        return made[-1]

    yield make
    for found in made:
        found.close()


@pytest.fixture
def delivery(make_delivery: Callable[..., Delivery]) -> Delivery:
    """A Delivery with the default settings."""
    return make_delivery()


class SharedRelay:
    """A worker and an ingest process on the test database, delivering to the sandbox,
    shared by the tests of a module that ask for the same settings: starting the pair
    cost more than most of those tests. A test hands them on only once nothing is
    queued, in flight or delayed, so no work of its own reaches the next test's Redis or
    sandbox; otherwise (or when a process died) they are stopped, and the next test
    starts its own."""

    running: ClassVar[list[SharedRelay]] = []  # those with processes up

    def __init__(self, redis_url: str, sandbox: Sandbox, logs: Path) -> None:
        self.redis_url, self.sandbox = redis_url, sandbox
        self.children = procs.Children(logs)
        self.settings: dict[str, Any] | None = None
        self.url = ""
        self._worker: Proc | None = None
        self._started = 0  # pairs started: each logs to files of its own

    def get(self, **settings: Any) -> str:
        """The base URL of an ingest process beside a ready worker, with these settings."""
        alive = self._worker is not None and not any(p.exited() for p in self.children.procs)
        if settings != self.settings or not alive:
            self.stop()
            # As the start_worker and start_ingest fixtures do: the worker sends to the
            # sandbox unless told otherwise.
            worker_env = relay_env(
                self.redis_url, **{"churnzero_url": self.sandbox.url + "/i", **settings}
            )
            n, self._started = self._started, self._started + 1
            # Started side by side: the worker imports Celery while ingest comes up.
            worker = procs.start_worker(
                self.children, worker_env, f"w{n}-{os.getpid()}", label=f"worker{n}"
            )
            env = relay_env(self.redis_url, **settings)
            self.url = procs.start_ingest(self.children, env, f"ingest{n}").url
            wait_for(
                lambda: " ready." in worker.log.read_text(errors="replace") or worker.exited(), 60
            )
            worker.check_alive()
            self._worker, self.settings = worker, settings
            SharedRelay.running.append(self)
        return self.url

    def release(self, r: redis.Redis) -> None:
        """The test is over: keep the pair for the next one only if its work is done."""
        deadline = time.monotonic() + 3
        while _busy_soon(r) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not settled(r):  # work left (a track waiting for its identify...): a fresh pair
            self.stop()

    def stop(self) -> None:
        self.children.stop_all()
        self.children.procs.clear()
        self._worker, self.settings = None, None
        if self in SharedRelay.running:
            SharedRelay.running.remove(self)


@pytest.fixture(autouse=True)
def _no_shared_relay_unasked(request: pytest.FixtureRequest) -> None:
    """A test that did not ask for `relay_url` runs without a shared worker left consuming
    beside it by the module's previous test."""
    if "shared_relay" not in request.fixturenames:
        for shared in list(SharedRelay.running):
            shared.stop()


def _busy_soon(r: redis.Redis) -> bool:
    """Work queued, in flight, or due back from the delayed set within 3 s."""
    due_by = float(r.time()[0]) + 3
    return (
        r.llen("relay") > 0 or r.llen("relay.replay") > 0 or r.hlen("unacked") > 0
        or r.zcount("relay:delayed", "-inf", due_by) > 0
    )  # fmt: skip


@pytest.fixture(scope="module")
def shared_relay(
    redis_url: str, sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SharedRelay]:
    """The module's shared worker and ingest process (see SharedRelay)."""
    shared = SharedRelay(redis_url, sandbox, tmp_path_factory.mktemp("relay"))
    try:
        yield shared
    finally:
        shared.stop()


@pytest.fixture
def relay_with(
    r: redis.Redis, clean_sandbox: Sandbox, shared_relay: SharedRelay
) -> Iterator[Callable[..., str]]:
    """Give a worker and an ingest process with these settings (relay_env's); returns
    the ingest URL. Shared with the module's other tests while their work is done (see
    SharedRelay)."""
    yield shared_relay.get
    shared_relay.release(r)


@pytest.fixture
def relay_url(relay_with: Callable[..., str]) -> str:
    """A worker and an ingest process on the test database, delivering to the sandbox
    (shared with the module's other tests while their work is done; see SharedRelay)."""
    return relay_with()


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def missing_tool(why: str) -> NoReturn:
    """A system tool the test needs is not here: skip locally, fail in CI."""
    if IN_CI:
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium (Debian's, driven by Playwright) for the module."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_tool("the playwright package is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        missing_tool(f"{CHROMIUM} is missing (apt-get install chromium)")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    finally:
        playwright.stop()


TOKEN = "t0k"  # the admin token of the browser tests
WAIT_MS = 10_000  # the page polls every 2 s


@dataclass
class Seen:
    """What a page did besides drawing: the URLs it fetched and its script errors."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def seen() -> Seen:
    """What the test's page fetched and its script errors."""
    return Seen()


@pytest.fixture
def page(browser: Any, seen: Seen) -> Iterator[Any]:
    """A fresh page (its own sessionStorage), watched by `seen`."""
    from playwright.sync_api import expect

    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.on("request", lambda request: seen.requests.append(request.url))
    tab.on("pageerror", lambda error: seen.errors.append(str(error)))
    yield tab
    context.close()


def log_in(page: Any, url: str, token: str) -> None:
    """Log in to the admin page with a token."""
    page.goto(url + "/admin")
    page.fill("#token", token)
    page.click("#login-submit")


def relay_cli(
    r: redis.Redis, *args: str, stdin: bytes | None = None, **settings: Any
) -> subprocess.CompletedProcess[str]:
    """Run the `relay` CLI against the test database (with these settings)."""
    return subprocess.run(
        [sys.executable, "-m", "relay.ops.cli", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True, text=True, cwd=ROOT, env=relay_env(url_of(r), **settings),
        timeout=60,
    )  # fmt: skip


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text output (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        sample, value = line.rsplit(" ", 1)
        sample_name, _, rest = sample.partition("{")
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if sample_name == name and got == want:
            return float(value)
    return 0.0
