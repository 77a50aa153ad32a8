"""OPC UA server: a real asyncua server and client on 127.0.0.1, real certificates and users.

Each test runs one scenario in its own event loop under a timeout; the server stops in a finally.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import statistics
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from asyncua import Client, Node, ua
from asyncua.common.subscription import Subscription
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from pipeline.bridge import certs
from pipeline.bridge.model import STATES, CommandResult, PlantCoil
from pipeline.bridge.opcua import (
    NAMESPACE_URI,
    RESULT_FIELDS,
    OpcUaError,
    OpcUaSink,
    check_config,
    result_id,
    size_arg,
    text_arg,
    vision_state,
)
from pipeline.config import OpcUaConfig
from pipeline.transport import users as userfile
from tests.pipeline.bridge.conftest import RecordingCommands, free_port, make_defect, make_status

PASSWORD = "correct horse battery"
TIMEOUT_S = 30.0
T = TypeVar("T")


@dataclass(frozen=True)
class Pki:
    certs_dir: Path
    users: Path
    foreign_cert: Path  # a well-formed client certificate the server was never told to trust
    foreign_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("opcua")
    certs.create_opcua_keys(base / "pki", clients=["plc"])
    certs.create_opcua_keys(base / "elsewhere", clients=["mallory"])
    userfile.add_user(base / "users", "op", PASSWORD)
    foreign_cert, foreign_key = certs.client_files(base / "elsewhere", "mallory")
    return Pki(certs_dir=base / "pki", users=base / "users", foreign_cert=foreign_cert, foreign_key=foreign_key)


def config(pki: Pki | None, **over: Any) -> OpcUaConfig:
    base: dict[str, Any] = {
        "endpoint": f"opc.tcp://127.0.0.1:{free_port()}/stripinspect/",
        "publishing_interval_ms": 10,
    }
    if pki is not None:
        base.update(certs_dir=pki.certs_dir, users_file=pki.users)
    return OpcUaConfig(**{**base, **over})


def run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, TIMEOUT_S)

    return asyncio.run(bounded())


@asynccontextmanager
async def serving(cfg: OpcUaConfig, commands: Any = None) -> AsyncIterator[OpcUaSink]:
    sink = OpcUaSink(cfg=cfg, commands=commands if commands is not None else RecordingCommands())
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()


async def secure_client(
    cfg: OpcUaConfig,
    pki: Pki,
    *,
    user: str | None = "op",
    password: str = PASSWORD,
    cert: Path | None = None,
    key: Path | None = None,
    app_uri: str | None = None,
) -> Client:
    client = Client(cfg.endpoint, timeout=5)
    default_cert, default_key = certs.client_files(pki.certs_dir, "plc")
    client.application_uri = app_uri or certs.client_app_uri("plc")
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(cert or default_cert),
        str(key or default_key),
        server_certificate=str(pki.certs_dir / certs.SERVER_CERT),
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    return client


async def mallory_client(cfg: OpcUaConfig, pki: Pki) -> Client:
    return await secure_client(
        cfg, pki, cert=pki.foreign_cert, key=pki.foreign_key, app_uri=certs.client_app_uri("mallory")
    )


async def refused(client: Client) -> Exception:
    try:
        await client.connect()
    except (TimeoutError, ua.UaError, OSError) as err:
        return err
    await client.disconnect()
    raise AssertionError("the server let the client in")


def sid(name: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(ns))


async def vs_node(client: Client, path: str = "") -> Node:
    ns = await client.get_namespace_index(NAMESPACE_URI)
    return client.get_node(sid(f"VisionSystem.{path}" if path else "VisionSystem", ns))


async def read(client: Client, path: str) -> Any:
    return await (await vs_node(client, path)).read_value()


class Events:
    """Client-side handler: every event with the time it arrived."""

    def __init__(self, want: int) -> None:
        self.got: list[tuple[float, Any]] = []
        self.want = want
        self.done = asyncio.Event()

    def event_notification(self, event: Any) -> None:
        self.got.append((time.time(), event))
        if len(self.got) >= self.want:
            self.done.set()


# ------------------------------------------------------------------------------------ pure core


def test_line_states_map_onto_the_vision_state_machine() -> None:
    expect = {
        "starting": ("Preoperational", 1, "", 0, False),
        "running": ("Operational", 4, "ContinuousExecution", 8, False),
        "drift": ("Operational", 4, "ContinuousExecution", 8, True),
        "camera_offline": ("Error", 3, "", 0, False),
        "stopped": ("Halted", 2, "", 0, False),
        "unknown": ("Preoperational", 1, "", 0, False),
        "something new": ("Preoperational", 1, "", 0, False),
    }
    assert set(STATES) <= set(expect)
    for line, want in expect.items():
        vs = vision_state(line)
        assert (vs.state, vs.number, vs.automatic, vs.automatic_number, vs.drift) == want, line


def test_result_fields_read_a_defect() -> None:
    d = make_defect(7, journal=None, coil_id=None, class_confidence=None, decision="reject")
    values = {f.name: f.value(d) for f in RESULT_FIELDS}
    assert values["ResultId"] == result_id(d) == "cam0/-/7"
    assert values["BridgeSeq"] == 7 and values["CoilId"] == "" and values["Reject"] is True
    assert values["ClassConfidence"] == -1.0 and values["CdMm"] == d.cd_mm
    assert values["PublishTime"] == d.publish_time and values["CaptureTime"] == d.capture_time
    assert len({f.name for f in RESULT_FIELDS}) == len(RESULT_FIELDS)


def test_method_arguments_are_checked() -> None:
    assert text_arg(" C1 ", "CoilId") == "C1"
    for bad in ("", "   ", 5, None, "x" * 201):
        with pytest.raises(ValueError, match="CoilId"):
            text_arg(bad, "CoilId")
    assert size_arg(1250, "WidthMm") == 1250.0 and size_arg(0.0, "WidthMm") is None
    for wrong in (-1.0, math.nan, math.inf, "12", True):
        with pytest.raises(ValueError, match="WidthMm"):
            size_arg(wrong, "WidthMm")


def test_configs_nobody_could_use_safely_are_refused(tmp_path: Path) -> None:
    with pytest.raises(OpcUaError, match="allow_insecure"):
        check_config(OpcUaConfig(users_file=tmp_path / "users"))
    with pytest.raises(OpcUaError, match="allow_anonymous"):
        check_config(OpcUaConfig(certs_dir=tmp_path))
    with pytest.raises(OpcUaError, match="endpoint"):
        check_config(OpcUaConfig(endpoint="http://127.0.0.1:4840/", certs_dir=tmp_path, users_file=tmp_path / "u"))
    check_config(OpcUaConfig(certs_dir=tmp_path, users_file=tmp_path / "u"))
    check_config(OpcUaConfig(allow_insecure=True, allow_anonymous=True))


# ---------------------------------------------------------------------------- start errors


def test_missing_files_and_a_taken_port_stop_the_start_with_one_line(pki: Pki, tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(OpcUaError, match="server_cert.der not found"):
            await OpcUaSink(cfg=config(pki, certs_dir=tmp_path), commands=RecordingCommands()).start()
        with pytest.raises(OpcUaError, match="users file not found"):
            await OpcUaSink(cfg=config(pki, users_file=tmp_path / "nope"), commands=RecordingCommands()).start()
        empty = tmp_path / "empty"
        empty.write_text("")
        with pytest.raises(OpcUaError, match="no users"):
            await OpcUaSink(cfg=config(pki, users_file=empty), commands=RecordingCommands()).start()
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            cfg = config(pki, endpoint=f"opc.tcp://127.0.0.1:{port}/stripinspect/")
            with pytest.raises(OpcUaError, match="cannot listen"):
                await OpcUaSink(cfg=cfg, commands=RecordingCommands()).start()

    run(scenario())


# ------------------------------------------------------------------------------ the server


def test_encrypted_client_gets_every_result_event_in_order(pki: Pki) -> None:
    n = 25
    cfg = config(pki)

    async def scenario() -> None:
        async with serving(cfg) as sink:
            client = await secure_client(cfg, pki)
            async with client:
                vs = await vs_node(client)
                event_type = client.get_node(sid("ResultReadyEventType", vs.nodeid.NamespaceIndex))
                on_vs, on_server = Events(n), Events(n)
                sub = await client.create_subscription(10, on_vs)
                await sub.subscribe_events(vs, event_type)
                sub2 = await client.create_subscription(10, on_server)
                await sub2.subscribe_events(client.nodes.server, event_type)
                sent = []
                for seq in range(1, n + 1):
                    d = make_defect(seq, publish_time=time.time())
                    sent.append(d)
                    await sink.defect(d)
                    await asyncio.sleep(0.005)
                await asyncio.wait_for(on_vs.done.wait(), 10)
                await asyncio.wait_for(on_server.done.wait(), 10)
                await asyncio.sleep(0.1)  # nothing more may come
                assert len(on_vs.got) == n and len(on_server.got) == n
                for (_, ev), d in zip(on_vs.got, sent, strict=True):
                    for f in RESULT_FIELDS:
                        want = f.value(d)
                        assert getattr(ev, f.name) == (pytest.approx(want) if isinstance(want, float) else want), f.name
                    assert ev.Severity == (700 if d.decision == "reject" else 300)
                    assert ev.SourceName == "VisionSystem"
                    assert "coil 24-118734" in ev.Message.Text
                assert [ev.BridgeSeq for _, ev in on_server.got] == list(range(1, n + 1))
                lat_ms = sorted((t - ev.PublishTime) * 1000 for t, ev in on_vs.got)
                p50 = statistics.median(lat_ms)
                print(f"\nOPC UA publish->client receipt over {n} events: p50 {p50:.1f} ms, max {lat_ms[-1]:.1f} ms")
                assert lat_ms[-1] < 1000.0  # sanity only; benchmarks/ measures the latency
            assert sink.counters()["events"] == n
            assert sink.counters()["sessions"] == 1

    run(scenario())


def test_the_server_grants_no_publishing_interval_under_its_floor(pki: Pki) -> None:
    cfg = config(pki, publishing_interval_ms=50)

    async def scenario() -> None:
        async with serving(cfg):
            client = await secure_client(cfg, pki)
            async with client:
                params = ua.CreateSubscriptionParameters(
                    RequestedPublishingInterval=0.0,
                    RequestedLifetimeCount=1000,
                    RequestedMaxKeepAliveCount=10,
                    MaxNotificationsPerPublish=0,
                    PublishingEnabled=True,
                    Priority=0,
                )
                sub = Subscription(client.uaclient.session, params, Events(1))
                result = await sub.init()
                assert result.RevisedPublishingInterval == 50.0
                await sub.delete()

    run(scenario())


def test_clients_without_trusted_certificate_user_or_encryption_are_refused(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(pki)

    async def scenario() -> None:
        async with serving(cfg) as sink:
            anonymous = await refused(await secure_client(cfg, pki, user=None))
            assert isinstance(anonymous, ua.uaerrors.BadIdentityTokenRejected)  # not offered at all
            wrong = await refused(await secure_client(cfg, pki, password="not the password"))
            assert isinstance(wrong, ua.uaerrors.BadUserAccessDenied)
            unknown = await refused(await secure_client(cfg, pki, user="nobody"))
            assert isinstance(unknown, ua.uaerrors.BadUserAccessDenied)
            untrusted = await refused(await mallory_client(cfg, pki))
            assert isinstance(untrusted, ua.uaerrors.BadCertificateUntrusted)
            # The certificate's URI must be the one the client announces.
            impostor = await refused(await secure_client(cfg, pki, app_uri=certs.client_app_uri("someone")))
            assert isinstance(impostor, ua.uaerrors.BadCertificateUriInvalid)

            plain = Client(cfg.endpoint, timeout=5)
            plain.set_user("op")
            plain.set_password(PASSWORD)
            with pytest.raises(ua.UaError, match="No matching endpoints"):
                await plain.connect()
            # A client that ignores the endpoint list and opens a None channel anyway: asyncua
            # accepts the channel, the server's gate must refuse the session.
            endpoints = await sink_endpoints(cfg)
            monkeypatch.setattr(Client, "find_endpoint", staticmethod(lambda eps, mode, uri: endpoints[0]))
            forced = Client(cfg.endpoint, timeout=5)
            forced.set_user("op")
            forced.set_password(PASSWORD)
            none_channel = await refused(forced)
            assert isinstance(none_channel, ua.uaerrors.BadUserAccessDenied)
            monkeypatch.undo()

            counters = sink.counters()
            assert counters["sessions"] == 0
            assert counters["sessions_refused"] >= 5, counters
            # ... and the right client still gets in.
            async with await secure_client(cfg, pki) as client:
                assert await read(client, "LineState") == "unknown"

    run(scenario())


def test_certificates_copied_into_trusted_count_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    local = Pki(certs_dir=tmp_path / "pki", users=pki.users, foreign_cert=pki.foreign_cert, foreign_key=pki.foreign_key)
    shutil.copytree(pki.certs_dir, local.certs_dir)
    cfg = config(local)

    async def scenario() -> None:
        async with serving(cfg):
            assert isinstance(await refused(await mallory_client(cfg, local)), ua.uaerrors.BadCertificateUntrusted)
            shutil.copy(pki.foreign_cert, local.certs_dir / certs.TRUSTED / pki.foreign_cert.name)
            async with await mallory_client(cfg, local) as client:
                assert await read(client, "LineState") == "unknown"
            (local.certs_dir / certs.TRUSTED / pki.foreign_cert.name).unlink()
            assert isinstance(await refused(await mallory_client(cfg, local)), ua.uaerrors.BadCertificateUntrusted)

    run(scenario())


async def sink_endpoints(cfg: OpcUaConfig) -> list[ua.EndpointDescription]:
    probe = Client(cfg.endpoint, timeout=5)
    return list(await probe.connect_and_get_server_endpoints())


def test_insecure_bench_serves_policy_none_to_anonymous_clients() -> None:
    cfg = config(None, allow_insecure=True, allow_anonymous=True)

    async def scenario() -> None:
        async with serving(cfg) as sink:
            await sink.status(make_status(3))
            async with Client(cfg.endpoint, timeout=5) as client:
                assert await read(client, "Bridge.Heartbeat") == 3
            assert sink.counters()["sessions"] == 1

    run(scenario())


def test_state_machine_and_status_follow_the_line(pki: Pki) -> None:
    cfg = config(pki)

    async def state(client: Client, path: str = "VisionStateMachine") -> tuple[str, int, Any]:
        text = (await read(client, f"{path}.CurrentState")).Text
        return text, await read(client, f"{path}.CurrentState.Number"), await read(client, f"{path}.CurrentState.Id")

    async def scenario() -> None:
        async with serving(cfg) as sink, await secure_client(cfg, pki) as client:
            assert (await state(client))[:2] == ("Preoperational", 1)
            ns = (await vs_node(client)).nodeid.NamespaceIndex
            auto = "VisionStateMachine.AutomaticModeStateMachine"
            await sink.status(make_status(1, "running"))
            operational = sid("VisionSystem.VisionStateMachine.Operational", ns)
            assert await state(client) == ("Operational", 4, operational)
            assert (await state(client, auto))[:2] == ("ContinuousExecution", 8)
            assert await read(client, "Drift") is False
            await sink.status(make_status(2, "drift"))
            assert (await state(client))[:2] == ("Operational", 4)
            assert await read(client, "Drift") is True
            await sink.status(make_status(3, "camera_offline"))
            assert (await state(client))[:2] == ("Error", 3)
            assert (await state(client, auto))[:2] == ("", 0)
            assert await read(client, "Cameras.cam0.Online") is False
            assert await read(client, "Cameras.cam0.State") == "camera_offline"
            await sink.status(make_status(4, "stopped", recipe=None))
            assert (await state(client))[:2] == ("Halted", 2)
            assert await read(client, "LineState") == "stopped"
            assert await read(client, "Bridge.Heartbeat") == 4
            assert await read(client, "Cameras.cam0.Frames") == 104
            assert await read(client, "RecipeManagement.ActiveRecipe") == ""
            assert await read(client, "RecipeManagement.Recipes") == ["DC01", "DC04"]
            assert await read(client, "CoilManagement.CurrentCoilId") == "24-118734"

    run(scenario())


class FlakyCommands(RecordingCommands):
    """A line whose control socket times out on recipe selection."""

    def select_recipe(self, name: str) -> CommandResult:
        if name == "DC01":
            raise TimeoutError("no answer from cam0 in 2 s")
        return super().select_recipe(name)


def test_methods_reach_the_line_and_refusals_come_back_bad(pki: Pki) -> None:
    cfg = config(pki)
    line = RecordingCommands()

    async def scenario() -> None:
        async with serving(cfg, line) as sink:
            async with await secure_client(cfg, pki) as client:
                recipes, coil = await vs_node(client, "RecipeManagement"), await vs_node(client, "CoilManagement")
                ns = recipes.nodeid.NamespaceIndex
                assert await recipes.call_method(f"{ns}:GetRecipeList") == ["DC01", "DC04"]
                await recipes.call_method(f"{ns}:ActivateRecipe", "DC01")
                assert await read(client, "RecipeManagement.ActiveRecipe") == "DC01"
                with pytest.raises(ua.uaerrors.BadInvalidArgument):
                    await recipes.call_method(f"{ns}:ActivateRecipe", "DC99")
                await coil.call_method(f"{ns}:CoilStart", "C1", "DC04", 1250.0, 0.8, 0.0)
                with pytest.raises(ua.uaerrors.BadInvalidArgument):
                    await coil.call_method(f"{ns}:CoilStart", "C2", "S355", 1250.0, 0.8, 0.0)
                calls = len(line.calls)
                with pytest.raises(ua.uaerrors.BadInvalidArgument):
                    await coil.call_method(f"{ns}:CoilStart", "C2", "DC04", -5.0, 0.8, 0.0)
                with pytest.raises(ua.uaerrors.BadInvalidArgument):
                    await coil.call_method(f"{ns}:CoilEnd", "")
                assert len(line.calls) == calls  # checked arguments never reach the line
                await coil.call_method(f"{ns}:CoilEnd", "C1")
                with pytest.raises(ua.uaerrors.BadInvalidArgument):
                    await coil.call_method(f"{ns}:CoilEnd", "C1")
            assert line.calls == [
                ("select_recipe", {"name": "DC01"}),
                ("select_recipe", {"name": "DC99"}),
                (
                    "coil_start",
                    {"coil_id": "C1", "grade": "DC04", "width_mm": 1250.0, "thickness_mm": 0.8, "length_m": None},
                ),
                (
                    "coil_start",
                    {"coil_id": "C2", "grade": "S355", "width_mm": 1250.0, "thickness_mm": 0.8, "length_m": None},
                ),
                ("coil_end", {"coil_id": "C1"}),
                ("coil_end", {"coil_id": "C1"}),
            ]
            assert sink.counters()["method_calls"] == 9
            assert sink.counters()["method_errors"] == 5

    run(scenario())


def test_a_failing_line_gives_a_bad_status_not_a_dead_server(pki: Pki) -> None:
    cfg = config(pki)

    async def scenario() -> None:
        async with serving(cfg, FlakyCommands()) as sink:
            async with await secure_client(cfg, pki) as client:
                recipes = await vs_node(client, "RecipeManagement")
                ns = recipes.nodeid.NamespaceIndex
                with pytest.raises(ua.uaerrors.BadInternalError):
                    await recipes.call_method(f"{ns}:ActivateRecipe", "DC01")
                await recipes.call_method(f"{ns}:ActivateRecipe", "DC04")
            assert sink.counters()["method_errors"] == 1

    run(scenario())


def test_latest_results_and_coil_messages_are_variables(pki: Pki) -> None:
    cfg = config(pki, latest_results=3)

    async def scenario() -> None:
        async with serving(cfg) as sink:
            for seq in range(1, 6):
                await sink.defect(make_defect(seq))
            await sink.coil(PlantCoil(kind="start", coil_id="C7", data={"camera_id": "cam0"}))
            await sink.coil(PlantCoil(kind="grading", coil_id="C7", data={"disposition": "hold", "grade": "DC04"}))
            await sink.coil(
                PlantCoil(kind="closed", coil_id="C7", data={"disposition": "secondary", "length_m": 812.5})
            )
            async with await secure_client(cfg, pki) as client:
                latest = [json.loads(s) for s in await read(client, "ResultManagement.LatestResults")]
                assert [r["bridge_seq"] for r in latest] == [5, 4, 3]
                assert latest[0]["result_id"] == "cam0/j-test/5" and latest[0]["decision"] == "reject"
                assert await read(client, "ResultManagement.LastResultId") == "cam0/j-test/5"
                assert await read(client, "ResultManagement.LastBridgeSeq") == 5
                assert await read(client, "CoilManagement.LastKind") == "closed"
                assert json.loads(await read(client, "CoilManagement.LastMessage"))["length_m"] == 812.5
                assert await read(client, "CoilManagement.GradingDisposition") == "hold"
                assert await read(client, "CoilManagement.ClosedCoilId") == "C7"
                assert await read(client, "CoilManagement.ClosedDisposition") == "secondary"
                assert await read(client, "CoilManagement.ClosedLengthM") == 812.5
                # Read-only to the plant.
                with pytest.raises(ua.uaerrors.BadUserAccessDenied):
                    await (await vs_node(client, "ResultManagement.LastBridgeSeq")).write_value(
                        ua.Variant(0, ua.VariantType.Int64)
                    )

    run(scenario())
