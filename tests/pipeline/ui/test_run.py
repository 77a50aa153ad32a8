"""``run_ui`` as the service runs it: start-up refusals in one line, a real start on 127.0.0.1
(HTTP and HTTPS), a clean stop."""

from __future__ import annotations

import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from cryptography.hazmat.primitives import serialization

from pipeline.bridge.certs import make_certificate
from pipeline.config import BridgeCameraConfig, Config, UiConfig
from pipeline.ui.auth import UiStartError
from pipeline.ui.run import run_ui, ui_cameras
from tests.pipeline.ui.fakeline import FakeDaemon, wait_for
from tests.pipeline.ui.harness import Client, make_users


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    context = zmq.Context()
    d = FakeDaemon(context=context)
    yield d
    d.close()
    context.term()


def config(tmp: Path, daemon: FakeDaemon, **ui: Any) -> Config:
    users, tokens, _ = make_users(tmp)
    base: dict[str, Any] = {
        "port": free_port(),
        "users_file": users,
        "tokens_file": tokens,
        "session_secret_file": tmp / "ui" / "session.key",
        "cameras": {"cam0": BridgeCameraConfig(pub=daemon.pub.endpoint, control=daemon.control)},
    }
    return Config(ui=UiConfig(**{**base, **ui}))


class Serving:
    def __init__(self, cfg: Config) -> None:
        self.stop = threading.Event()
        self.result: list[Any] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self._run(cfg)), daemon=True)

    def _run(self, cfg: Config) -> Any:
        try:
            return run_ui(cfg, quiet=True, stop=self.stop)
        except Exception as err:  # reported to the test
            return err

    def __enter__(self) -> Serving:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive(), "run_ui did not stop"


def up(client: Client, serving: Serving) -> bool:
    if serving.result:
        raise AssertionError(f"run_ui ended: {serving.result[0]!r}")
    try:
        return client.get("/healthz").status == 200
    except OSError:
        return False


def test_it_serves_and_stops_on_the_stop_event(tmp_path: Path, daemon: FakeDaemon) -> None:
    cfg = config(tmp_path, daemon)
    with Serving(cfg) as s:
        c = Client(f"http://127.0.0.1:{cfg.ui.port}")
        wait_for(lambda: up(c, s), what="the station up")
        assert stat.S_IMODE((tmp_path / "ui" / "session.key").stat().st_mode) == 0o600
        assert c.login("op").status == 303
        assert c.get("/").status == 200
    assert s.result == [0]
    # The port is free again.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", cfg.ui.port))


def test_https_with_a_certificate_and_secure_cookies(tmp_path: Path, daemon: FakeDaemon) -> None:
    cert, key = make_certificate(common_name="station", app_uri="urn:test", hostnames=["127.0.0.1"], server=True)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cfg = config(tmp_path, daemon, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
    with Serving(cfg) as s:
        c = Client(f"https://127.0.0.1:{cfg.ui.port}")
        wait_for(lambda: up(c, s), what="the station up over HTTPS")
        assert c.login("op").status == 303
        cookie = c.set_cookie_headers[-1].lower()
        assert "secure" in cookie and "httponly" in cookie and "samesite=strict" in cookie
        assert c.get("/").headers["strict-transport-security"] == "max-age=31536000"
        plain = Client(f"http://127.0.0.1:{cfg.ui.port}")
        with pytest.raises((OSError, ConnectionError)):
            plain.get("/healthz")


@pytest.mark.parametrize(
    ("ui", "message"),
    [
        ({"host": "0.0.0.0"}, "ui.host '0.0.0.0' is not loopback"),
        ({"users_file": None}, "ui.users_file is not set"),
        ({"tls_cert": Path("/nonexistent/c.pem"), "tls_key": Path("/nonexistent/k.pem")}, "cannot load"),
    ],
)
def test_start_up_problems_are_one_line(tmp_path: Path, daemon: FakeDaemon, ui: dict[str, Any], message: str) -> None:
    with pytest.raises(UiStartError, match=message) as err:
        run_ui(config(tmp_path, daemon, **ui), quiet=True, stop=threading.Event())
    assert "\n" not in str(err.value)


def test_a_taken_port_is_one_line(tmp_path: Path, daemon: FakeDaemon) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(UiStartError, match=rf"cannot listen on 127.0.0.1:{port}: Address already in use"):
            run_ui(config(tmp_path, daemon, port=port), quiet=True, stop=threading.Event())


def test_without_ui_cameras_it_follows_this_configs_daemon() -> None:
    cfg = Config()
    cams = ui_cameras(cfg)
    assert cams == {
        cfg.daemon.camera_id: BridgeCameraConfig(pub=cfg.daemon.pub_endpoint, control=cfg.daemon.control_endpoint)
    }
