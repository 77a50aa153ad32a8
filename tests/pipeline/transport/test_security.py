"""Who may listen and command: CURVE on every socket, loopback control, no unsafe loading."""

import ast
from pathlib import Path

import pytest
import zmq
import zmq.auth

from pipeline.acquisition.sources import SyntheticSource
from pipeline.config import DaemonConfig, RuntimeConfig, ScoringConfig, SourceConfig
from pipeline.service.daemon import Daemon
from pipeline.transport.listen import ClientKeys
from pipeline.transport.security import SecurityError, create_keys
from tests.conftest import REPO, loopback_daemon_config


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys") / "keys"
    create_keys(out, ["plc"])
    # A certificate nobody authorised: right format, unknown key.
    zmq.auth.create_certificates(str(out.parent), "intruder")
    return out


def _daemon(bundle: Path, keys: Path | None) -> Daemon:
    src = SourceConfig(block_lines=128, line_rate_hz=None, plant_defects=False, strip_lines=768, first_line=0)
    cfg = loopback_daemon_config(
        bundle=bundle,
        frame_lines=768,
        overlap_lines=384,
        heartbeat_s=0.05,
        curve_keys=keys,
        source=src,
    )
    source = SyntheticSource(cfg=src, width=256, seed=3, frame_lines=768)
    return Daemon(cfg=cfg, runtime=RuntimeConfig(), scoring=ScoringConfig(), source=source, context=zmq.Context())


def _heartbeats(ctx: zmq.Context, endpoint: str, keys: ClientKeys | None, client_key: Path | None = None) -> int:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"heartbeat")
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    got = 0
    for _ in range(15):  # 1.5 s at 20 heartbeats per second
        if sock.poll(100):
            sock.recv_multipart()
            got += 1
    sock.close(0)
    return got


def _command(ctx: zmq.Context, endpoint: str, keys: ClientKeys | None) -> dict | None:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 1500)
    if keys is not None:
        keys.apply(sock)
    sock.connect(endpoint)
    sock.send_json({"cmd": "status"})
    try:
        return sock.recv_json()  # type: ignore[return-value]
    except zmq.Again:
        return None
    finally:
        sock.close(0)


def test_only_authorised_keys_receive_and_command(strip_bundle: Path, keys: Path) -> None:
    daemon = _daemon(strip_bundle, keys)
    daemon.start(acquire=False)
    ctx = daemon._context
    server = keys / "server.key"
    plc = ClientKeys(client_key=keys / "clients" / "plc.key_secret", server_key=server)
    intruder = ClientKeys(client_key=keys.parent / "intruder.key_secret", server_key=server)
    try:
        assert _heartbeats(ctx, daemon.publisher.endpoint, plc) >= 5
        assert _heartbeats(ctx, daemon.publisher.endpoint, intruder) == 0
        assert _heartbeats(ctx, daemon.publisher.endpoint, None) == 0  # plain text: no handshake
        status = _command(ctx, daemon.control_endpoint, plc)
        assert status is not None and status["ok"] is True
        assert _command(ctx, daemon.control_endpoint, intruder) is None
        assert _command(ctx, daemon.control_endpoint, None) is None
    finally:
        daemon.stop()
        daemon.join()
        ctx.term()


def test_without_keys_the_sockets_are_open_and_control_must_stay_on_loopback(strip_bundle: Path) -> None:
    daemon = _daemon(strip_bundle, None)
    daemon.start(acquire=False)
    ctx = daemon._context
    try:
        # The check above can fail: without CURVE a plain subscriber hears the daemon.
        assert _heartbeats(ctx, daemon.publisher.endpoint, None) >= 5
    finally:
        daemon.stop()
        daemon.join()
        ctx.term()
    with pytest.raises(ValueError, match="not on loopback: set curve_keys"):
        DaemonConfig(control_endpoint="tcp://0.0.0.0:5556")
    assert DaemonConfig(control_endpoint="tcp://0.0.0.0:5556", curve_keys=Path("keys")).curve_keys == Path("keys")
    assert DaemonConfig().control_endpoint.startswith("tcp://127.0.0.1:")


def test_missing_or_broken_keys_are_one_clear_error(strip_bundle: Path, tmp_path: Path, keys: Path) -> None:
    with pytest.raises(SecurityError, match="key file not found"):
        _daemon(strip_bundle, tmp_path / "nothing")
    empty = tmp_path / "empty"
    create_keys(empty, [])
    with pytest.raises(SecurityError, match="no client public keys"):
        _daemon(strip_bundle, empty)
    with pytest.raises(SecurityError, match="already holds a server certificate"):
        create_keys(keys, ["again"])


def test_no_pickle_eval_or_unsafe_yaml_anywhere() -> None:
    offenders = []
    for path in sorted(
        p for d in ("pipeline", "export", "calibration", "stripinspect") for p in (REPO / d).rglob("*.py")
    ):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            unsafe = ("pickle", "dill", "marshal", "shelve", "cloudpickle", "joblib")
            if isinstance(node, ast.Import):
                offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.split(".")[0] in unsafe]
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in unsafe:
                # Only exception types may come from there (to catch torch.load's refusals).
                offenders += [
                    f"{path.name}: from {node.module} import {a.name}"
                    for a in node.names
                    if not a.name.endswith("Error")
                ]
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                # Builtin eval/exec (a torch module's .eval() is its inference mode, not Python's).
                if (isinstance(f, ast.Name) and name in ("eval", "exec")) or name in ("unsafe_load", "full_load"):
                    offenders.append(f"{path.name}:{node.lineno}: {name}()")
                if name == "load" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "yaml":
                    offenders.append(f"{path.name}:{node.lineno}: yaml.load()")
                if (
                    name == "load"
                    and isinstance(f, ast.Attribute)
                    and getattr(f.value, "id", "") in ("torch", "np", "numpy")
                ):
                    kw = {k.arg: k.value for k in node.keywords}
                    safe = kw.get("weights_only") if getattr(f.value, "id", "") == "torch" else kw.get("allow_pickle")
                    wanted = getattr(f.value, "id", "") == "torch"
                    if not (isinstance(safe, ast.Constant) and safe.value is wanted):
                        offenders.append(f"{path.name}:{node.lineno}: {f.value.id}.load() without the safe flag")  # type: ignore[attr-defined]
    assert offenders == []
