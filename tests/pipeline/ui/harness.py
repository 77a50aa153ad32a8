"""A running station for the tests: the real app on a real uvicorn server (127.0.0.1, a free
port, its own thread), following real ZeroMQ publishers (``fakeline``), and a small HTTP client
that keeps the session cookie and does not follow redirects (so tests see each answer)."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import zmq

from pipeline.config import BridgeCameraConfig, BridgeCoilServiceConfig, CoilConfig
from pipeline.transport.users import add_token, add_user
from pipeline.ui.app import Settings, Station, build_app
from pipeline.ui.auth import Credentials
from pipeline.ui.hub import Hub
from pipeline.ui.line import Line
from pipeline.ui.past import PastCoils
from pipeline.ui.run import UiServer, bind_socket
from pipeline.ui.state import LineState
from tests.pipeline.ui.fakeline import FakeDaemon, wait_for

PASSWORD = "correct horse battery"
SECRET = "0123456789abcdef" * 4


def make_users(folder: Path) -> tuple[Path, Path, dict[str, str]]:
    """A users file with operator ``op`` and viewer ``vi``, and a tokens file with one token of
    each role (returned by name)."""
    users = folder / "users"
    add_user(users, "op", PASSWORD, role="operator")
    add_user(users, "vi", PASSWORD, role="viewer")
    tokens = folder / "tokens"
    issued = {
        "api-op": add_token(tokens, "api-op", role="operator"),
        "api-vi": add_token(tokens, "api-vi", role="viewer"),
    }
    return users, tokens, issued


@dataclass
class Running:
    url: str
    station: Station
    line: Line
    daemons: dict[str, FakeDaemon]
    tokens: dict[str, str] = field(default_factory=dict)

    def seen(self, camera_id: str) -> bool:
        return any(
            p.view is not None for p in self.station.state.panels(now=time.monotonic()) if p.camera_id == camera_id
        )

    def until_following(self, timeout_s: float = 10.0) -> None:
        """Heartbeats until every camera's subscription is live (PUB drops what it sends before)."""
        for cid, d in self.daemons.items():

            def beat(cid: str = cid, d: FakeDaemon = d) -> bool:
                d.heartbeat()
                time.sleep(0.02)
                return self.seen(cid)

            wait_for(beat, timeout_s=timeout_s, what=f"the station to follow {cid}")


@contextmanager
def running_station(
    tmp: Path,
    *,
    context: zmq.Context,
    daemons: list[FakeDaemon],
    coil_pub: str | None = None,
    coil: CoilConfig | None = None,
    coil_db: Path | None = None,
    reports_dir: Path | None = None,
    recent_alerts: int = 200,
    session_max_age_s: int = 3600,
    login_delay_s: float = 0.05,
    tls: tuple[Path, Path] | None = None,
    controls: dict[str, str] | None = None,
) -> Iterator[Running]:
    users, tokens, issued = make_users(tmp)
    cameras = {d.camera_id: BridgeCameraConfig(pub=d.pub.endpoint, control=d.control) for d in daemons}
    state = LineState(cameras=list(cameras), recent_alerts=recent_alerts, stale_s=3.0)
    hub = Hub(queue_size=64)
    coil_service = None if coil_pub is None else BridgeCoilServiceConfig(pub=coil_pub, control="tcp://127.0.0.1:1")
    line = Line(cameras=cameras, coil_service=coil_service, state=state, hub=hub, context=context)
    past = PastCoils(db=coil_db, reports_dir=reports_dir)
    station = Station(
        settings=Settings(
            controls=controls or {cid: c.control for cid, c in cameras.items()},
            coil=coil or CoilConfig(),
            session_max_age_s=session_max_age_s,
            tls=tls is not None,
            feedback_timeout_s=2.0,
            overlay_timeout_s=1.0,
            login_delay_s=login_delay_s,
        ),
        state=state,
        hub=hub,
        credentials=Credentials(users_file=users, tokens_file=tokens),
        past=past,
        context=context,
    )
    server = UiServer(
        app=build_app(station, secret=SECRET),
        sock=bind_socket("127.0.0.1", 0),
        tls_cert=None if tls is None else tls[0],
        tls_key=None if tls is None else tls[1],
    )
    line.start()
    try:
        server.start(timeout_s=10.0)
        yield Running(
            url=server.url, station=station, line=line, daemons={d.camera_id: d for d in daemons}, tokens=issued
        )
    finally:
        hub.close()
        server.stop()
        line.stop()
        past.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """HTTP(S) to the station with one cookie jar (the session cookie) and a timeout."""

    def __init__(self, url: str, *, timeout_s: float = 10.0) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname or "127.0.0.1", parts.port or 80
        self.tls = parts.scheme == "https"
        self.timeout_s = timeout_s
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    def _conn(self) -> http.client.HTTPConnection:
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the tests' self-signed certificate
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=ctx)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def request(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Reply:
        h = dict(headers or {})
        if self.cookies and "Cookie" not in h:
            h["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=h)
            resp = conn.getresponse()
            data = resp.read()
            for k, v in resp.getheaders():
                if k.lower() == "set-cookie":
                    self.set_cookie_headers.append(v)
                    name, _, rest = v.partition("=")
                    value = rest.split(";", 1)[0]
                    if value == "null" or "expires=Thu, 01 Jan 1970" in v:
                        self.cookies.pop(name, None)
                    else:
                        self.cookies[name] = value
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post(self, path: str, data: dict[str, Any], *, origin: str | None = "own", **kw: Any) -> Reply:
        headers = {"Content-Type": "application/x-www-form-urlencoded", **kw.pop("headers", {})}
        if origin == "own":
            headers["Origin"] = self.url
        elif origin is not None:
            headers["Origin"] = origin
        return self.request("POST", path, body=urlencode(data).encode(), headers=headers, **kw)

    def csrf(self, path: str = "/login") -> str:
        page = self.get(path).text
        found = re.search(r'name="csrf" value="([^"]+)"', page)
        assert found, f"no CSRF token on {path}"
        return found.group(1)

    def login(self, user: str, password: str = PASSWORD) -> Reply:
        token = self.csrf("/login")
        return self.post("/login", {"user": user, "password": password, "csrf": token, "next": "/"})
