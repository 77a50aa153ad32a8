"""``stripinspect ui``: the operator station until SIGTERM or SIGINT.

Checks where it may listen, reads the users (and tokens), makes or reads the session key, binds
its socket (so a port taken is one clear line, not a traceback from the server's thread), starts
the line followers and uvicorn, tells systemd when it is ready and that its loop lives, and stops
in reverse order: event streams ended, server drained, followers joined, sockets closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
import zmq
from starlette.applications import Starlette

from pipeline.config import BridgeCameraConfig, Config
from pipeline.process import logging_to, notify, stop_on_signals
from pipeline.ui.app import Settings, Station, build_app
from pipeline.ui.auth import Credentials, UiStartError, check_bind, session_secret
from pipeline.ui.hub import Hub
from pipeline.ui.line import Line
from pipeline.ui.past import PastCoils
from pipeline.ui.state import LineState

log = logging.getLogger("stripinspect.ui")
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0
LOOP_STALE_S = 10.0  # the server's loop silent this long: no watchdog beat (systemd restarts us)
STALE_HEARTBEATS = 3.0  # a camera silent for this many heartbeat periods is shown as silent
HUB_QUEUE = 256  # updates waiting per browser before its oldest are dropped


def ui_cameras(cfg: Config) -> dict[str, BridgeCameraConfig]:
    """``ui.cameras``, or the one daemon of this config."""
    if cfg.ui.cameras:
        return dict(cfg.ui.cameras)
    d = cfg.daemon
    return {d.camera_id: BridgeCameraConfig(pub=d.pub_endpoint, control=d.control_endpoint)}


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0: any free one)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise UiStartError(f"ui.host {host!r}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UiStartError(f"ui: cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


class UiServer:
    """uvicorn serving ``app`` on ``sock``, in a thread of its own (its loop; signals stay with
    the caller, which owns the stop event)."""

    def __init__(
        self,
        *,
        app: Starlette,
        sock: socket.socket,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on",
            ws="none",
            # Not behind a proxy: X-Forwarded-For from a local client must not pick the address
            # that failed logins are counted against.
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=3,
            ssl_certfile=None if tls_cert is None else str(tls_cert),
            ssl_keyfile=None if tls_key is None else str(tls_key),
        )
        try:
            config.load()  # reads the certificate and key now, in the caller's thread
        except (OSError, ssl.SSLError) as err:
            raise UiStartError(f"ui.tls_cert / ui.tls_key: cannot load: {err}") from None
        self.sock = sock
        self.server = uvicorn.Server(config)
        self.tls = tls_cert is not None
        self._thread = threading.Thread(target=self._run, name="stripinspect-ui-http", daemon=True)
        self.failed: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve(sockets=[self.sock]))
        except BaseException as err:  # SystemExit from uvicorn's startup included: reported, not raised here
            self.failed = err

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise UiStartError(f"ui: the web server did not start: {self.failed!r}")
            time.sleep(0.02)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.sock.close()


@contextlib.contextmanager
def _server_logs() -> Iterator[None]:
    """uvicorn's own messages (errors, start-up) through our handlers (text or JSON)."""
    ours = logging.getLogger("stripinspect")
    theirs = logging.getLogger("uvicorn")
    level, propagate = theirs.level, theirs.propagate
    for h in ours.handlers:
        theirs.addHandler(h)
    theirs.setLevel(logging.WARNING)
    theirs.propagate = False
    try:
        yield
    finally:
        for h in ours.handlers:
            theirs.removeHandler(h)
        theirs.setLevel(level)
        theirs.propagate = propagate


def run_ui(cfg: Config, *, quiet: bool = False, log_json: bool = False, stop: threading.Event | None = None) -> int:
    stop = stop or threading.Event()
    u = cfg.ui
    with logging_to(sys.stderr, quiet=quiet, log_json=log_json, tty=False), stop_on_signals(stop), _server_logs():
        tls = check_bind(host=u.host, tls_cert=u.tls_cert, tls_key=u.tls_key, allow_insecure_bind=u.allow_insecure_bind)
        if u.users_file is None:
            raise UiStartError("ui.users_file is not set: make one with `stripinspect ui-user NAME --users-file FILE`")
        credentials = Credentials(users_file=u.users_file, tokens_file=u.tokens_file)
        secret = session_secret(u.session_secret_file)
        cameras = ui_cameras(cfg)
        state = LineState(
            cameras=list(cameras), recent_alerts=u.recent_alerts, stale_s=STALE_HEARTBEATS * cfg.daemon.heartbeat_s
        )
        hub = Hub(queue_size=HUB_QUEUE)
        past = PastCoils(db=u.coil_db, reports_dir=u.reports_dir)
        context = zmq.Context()
        try:
            station = Station(
                settings=Settings(
                    controls={cid: c.control for cid, c in cameras.items()},
                    coil=cfg.coil,
                    session_max_age_s=u.session_max_age_s,
                    tls=tls,
                ),
                state=state,
                hub=hub,
                credentials=credentials,
                past=past,
                context=context,
            )
            server = UiServer(
                app=build_app(station, secret=secret),
                sock=bind_socket(u.host, u.port),
                tls_cert=u.tls_cert,
                tls_key=u.tls_key,
            )
            line = Line(cameras=cameras, coil_service=u.coil_service, state=state, hub=hub, context=context)
            line.start()
            try:
                server.start()
                notify("READY=1")
                log.info("ui: serving %s for %d camera(s): %s", server.url, len(cameras), ", ".join(cameras))
                while not stop.is_set() and server.running:
                    stop.wait(0.5)
                    # The watchdog is fed while the web loop ticks and every follower lives: a
                    # station showing a frozen line must be restarted, not kept.
                    if time.monotonic() - station.tick < LOOP_STALE_S and line.alive:
                        notify("WATCHDOG=1")
            finally:
                hub.close()
                server.stop()
                line.stop()
        finally:
            past.close()
            context.term()
        if server.failed is not None and not stop.is_set():
            raise UiStartError(f"ui: the web server stopped: {server.failed!r}")
    log.info("ui stopped")
    return 0
