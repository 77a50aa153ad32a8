"""OPC UA server for the plant, shaped on OPC 40100-1 (Machine Vision).

Not the official nodeset: the objects the spec names (``VisionSystem``, ``VisionStateMachine`` with
its ``AutomaticModeStateMachine``, ``RecipeManagement``, ``ResultManagement``, a
``ResultReadyEventType``) are built with asyncua under our own namespace (``NAMESPACE_URI``), with
flat fields a PLC can take without decoding structures. docs/plant_opcua.md is the map.

Pure core first (state mapping, result fields, argument checks), then the server (``OpcUaSink``).
The server offers Basic256Sha256 SignAndEncrypt only, plus None when ``allow_insecure``; clients
prove themselves twice: their certificate must be in ``trusted/`` and their user and password in
the users file (``pipeline.transport.users``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import attrgetter
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from asyncua import Node, Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.truststore import TrustStore
from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
from asyncua.server.event_generator import EventGenerator
from asyncua.server.user_managers import UserManager
from cryptography import x509

from pipeline.bridge import certs
from pipeline.bridge.model import CameraStatus, CommandResult, LineStatus, PlantCoil, PlantCommands, PlantDefect
from pipeline.config import OpcUaConfig
from pipeline.errors import StripinspectError
from pipeline.process import RateLimitedLog
from pipeline.transport.users import UserRecord, load_users, verify_password

log = logging.getLogger("stripinspect.bridge.opcua")

NAMESPACE_URI = "http://stripinspect.org/UA/MachineVision/"
ROOT = "VisionSystem"

# StateNumber values of OPC 40100-1 Table 82 (VisionStateMachineType) and Table 97
# (VisionAutomaticModeStateMachineType).
VISION_STATES: dict[str, int] = {"Preoperational": 1, "Halted": 2, "Error": 3, "Operational": 4}
AUTOMATIC_STATES: dict[str, int] = {"Initialized": 5, "Ready": 6, "SingleExecution": 7, "ContinuousExecution": 8}

# The daemon's heartbeat state -> the vision state machine. A strip line inspects continuously, so
# an inspecting line is Operational/ContinuousExecution; drift keeps inspecting (flagged).
LINE_TO_VISION: dict[str, str] = {
    "starting": "Preoperational",
    "running": "Operational",
    "drift": "Operational",
    "camera_offline": "Error",
    "stopped": "Halted",
    "unknown": "Preoperational",
}

SEVERITY_REJECT = 700
SEVERITY_ACCEPT = 300
MAX_TEXT = 200


class OpcUaError(StripinspectError):
    """The OPC UA server cannot start (config, certificates, users, port); one line."""


# ------------------------------------------------------------------------------------ pure core


@dataclass(frozen=True)
class VisionState:
    """Where the vision state machine stands: ``state`` (and its number) in VisionStateMachine,
    ``automatic`` in its AutomaticModeStateMachine ("" and 0 when not Operational), ``drift``."""

    state: str
    number: int
    automatic: str
    automatic_number: int
    drift: bool


def vision_state(line_state: str) -> VisionState:
    """The vision state for a line state (``model.STATES``); anything unknown is Preoperational."""
    state = LINE_TO_VISION.get(line_state, "Preoperational")
    automatic = "ContinuousExecution" if state == "Operational" else ""
    return VisionState(
        state=state,
        number=VISION_STATES[state],
        automatic=automatic,
        automatic_number=AUTOMATIC_STATES.get(automatic, 0),
        drift=line_state == "drift",
    )


def result_id(d: PlantDefect) -> str:
    """The daemon's own numbering of the defect, unique across cameras and restarts."""
    return f"{d.camera_id}/{d.journal or '-'}/{d.seq}"


@dataclass(frozen=True)
class ResultField:
    """One field of ResultReadyEventType: browse name, OPC UA type, how to read it off a defect."""

    name: str
    vtype: ua.VariantType
    value: Callable[[PlantDefect], Any]
    doc: str


_S, _D, _I, _B = ua.VariantType.String, ua.VariantType.Double, ua.VariantType.Int64, ua.VariantType.Boolean

# One table makes both the event type's properties and each event's values.
RESULT_FIELDS: tuple[ResultField, ...] = (
    ResultField("ResultId", _S, result_id, "camera_id/journal/seq"),
    ResultField("BridgeSeq", _I, attrgetter("bridge_seq"), "the bridge's number: 1, 2, 3 ... no gaps"),
    ResultField("CameraId", _S, attrgetter("camera_id"), "camera that saw it"),
    ResultField("CoilId", _S, lambda d: d.coil_id or "", "coil, '' outside a coil"),
    ResultField("Side", _S, attrgetter("side"), "strip side"),
    ResultField("MdM", _D, attrgetter("md_m"), "m from the coil head"),
    ResultField("StripMdM", _D, attrgetter("strip_md_m"), "m from strip line 0"),
    ResultField("CdMm", _D, attrgetter("cd_mm"), "mm across the strip"),
    ResultField("LengthMm", _D, attrgetter("length_mm"), "mm along the strip"),
    ResultField("WidthMm", _D, attrgetter("width_mm"), "mm across the strip"),
    ResultField("AreaMm2", _D, attrgetter("area_mm2"), "mm2"),
    ResultField("Score", _D, attrgetter("score"), "anomaly score, model units"),
    ResultField("Threshold", _D, attrgetter("threshold"), "pixel threshold in force"),
    ResultField("Class", _S, attrgetter("defect_class"), "defect class"),
    ResultField(
        "ClassConfidence", _D, lambda d: -1.0 if d.class_confidence is None else d.class_confidence, "0..1, -1: none"
    ),
    ResultField("Decision", _S, attrgetter("decision"), "reject or accept"),
    ResultField("Reject", _B, lambda d: d.decision == "reject", "Decision == reject"),
    ResultField("RejectInM", _D, attrgetter("reject_in_m"), "m of strip until the reject actuator"),
    ResultField("CaptureTime", _D, attrgetter("capture_time"), "Unix s, frame capture"),
    ResultField("PublishTime", _D, attrgetter("publish_time"), "Unix s, alert published by the daemon"),
)


def result_severity(d: PlantDefect) -> int:
    return SEVERITY_REJECT if d.decision == "reject" else SEVERITY_ACCEPT


def result_message(d: PlantDefect) -> str:
    coil = d.coil_id or "-"
    return f"{d.decision} {d.defect_class} coil {coil} {d.side} at {d.md_m:.2f} m, {d.cd_mm:.0f} mm"


def result_json(d: PlantDefect) -> str:
    return json.dumps({"result_id": result_id(d), **d.to_json()}, separators=(",", ":"))


def common_recipes(cameras: Sequence[CameraStatus]) -> list[str]:
    """The recipes every camera knows, in the first camera's order."""
    if not cameras:
        return []
    known = [set(c.recipes) for c in cameras[1:]]
    return [r for r in cameras[0].recipes if all(r in k for k in known)]


def text_arg(value: Any, what: str) -> str:
    """A non-empty string argument of a method; ValueError says what is wrong."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT:
        raise ValueError(f"{what} must be a string of 1 to {MAX_TEXT} characters, got {value!r}")
    return value.strip()


def size_arg(value: Any, what: str) -> float | None:
    """A size argument: a finite number >= 0, where 0 means "not known" (a PLC cannot pass null)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0 (0: unknown), got {value!r}")
    return float(value) if value > 0 else None


def check_config(cfg: OpcUaConfig) -> None:
    """What makes a server nobody could reach safely, refused before anything starts."""
    url = urlparse(cfg.endpoint)
    if url.scheme != "opc.tcp" or not url.hostname or url.port is None:
        raise OpcUaError(f"opcua.endpoint {cfg.endpoint!r}: expected opc.tcp://HOST:PORT/PATH")
    if cfg.certs_dir is None and not cfg.allow_insecure:
        raise OpcUaError(
            "opcua.certs_dir is not set and opcua.allow_insecure is false: make certificates with "
            "`stripinspect keys --opcua --out DIR --clients NAME` (or allow_insecure on a test bench)"
        )
    if cfg.users_file is None and not cfg.allow_anonymous:
        raise OpcUaError(
            "opcua.users_file is not set and opcua.allow_anonymous is false: nobody could log in "
            "(add users with `stripinspect keys --opcua-user NAME --users-file FILE`)"
        )


# ---------------------------------------------------------------------------------- the gate


class SessionGate(UserManager):
    """asyncua's user manager: who may activate a session.

    asyncua 2.1 opens a secure channel with policy None even when the server offers only
    Basic256Sha256 (it falls back to the connection's initial None policy), so the policy is
    checked here too: without ``allow_insecure`` the channel must carry a client certificate,
    and that certificate must be trusted (CreateSession checked the one the client *named*, which
    need not be the one it signs the channel with)."""

    def __init__(
        self,
        *,
        users_file: Path | None,
        allow_anonymous: bool,
        trust: TrustStore | None,
        require_certificate: bool,
        on_refused: Callable[[str, str], None],
        on_accepted: Callable[[], None],
    ) -> None:
        if require_certificate and trust is None:
            raise ValueError("a required certificate needs a trust store")
        self._users_file = users_file
        self._allow_anonymous = allow_anonymous
        self._trust = trust
        self._require_certificate = require_certificate
        self._on_refused = on_refused
        self._on_accepted = on_accepted
        self._users: dict[str, UserRecord] = {}
        self._users_mtime: int | None = None
        if users_file is not None:
            self._reload()

    def _reload(self) -> None:
        assert self._users_file is not None
        mtime = self._users_file.stat().st_mtime_ns
        if mtime != self._users_mtime:
            self._users = load_users(self._users_file)
            self._users_mtime = mtime

    def _current_users(self) -> dict[str, UserRecord]:
        """The users file as it is now: users added while the bridge runs can log in."""
        if self._users_file is not None:
            try:
                self._reload()
            except (OSError, certs.CertsError) as err:
                log.error("opcua: users file unreadable, keeping the users read before: %s", err)
        return self._users

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if self._require_certificate:
            if not certificate:
                self._on_refused("no-certificate", "a session without a client certificate (security policy None)")
                return None
            try:
                cert = x509.load_der_x509_certificate(bytes(certificate))
            except ValueError:
                self._on_refused("bad-certificate", "a session whose channel certificate cannot be read")
                return None
            assert self._trust is not None
            if not self._trust.is_trusted(cert):
                self._on_refused(
                    "untrusted", f"a session signed by an untrusted certificate ({cert.subject.rfc4514_string()})"
                )
                return None
        if username is None:
            if not self._allow_anonymous:
                self._on_refused("anonymous", "an anonymous session (allow_anonymous is false)")
                return None
            self._on_accepted()
            return User(role=UserRole.User)
        secret = password.decode("utf-8", "replace") if isinstance(password, bytes) else (password or "")
        if not verify_password(self._current_users().get(username), secret):
            self._on_refused(f"login:{username}", f"user {username!r}: wrong user name or password")
            return None
        self._on_accepted()
        return User(role=UserRole.User, name=username)


def clamp_publishing_interval(server: Server, floor_ms: float) -> None:
    """Grant no subscription a publishing interval under ``floor_ms``.

    asyncua grants whatever a client asks, 0 included (a subscription without keep-alives), and
    each subscription polls at its interval; the floor bounds that load. asyncua has no setting
    for it, so its CreateSubscription entry point is wrapped."""
    service = server.iserver.subscription_service
    create = service.create_subscription

    async def create_subscription(
        params: ua.CreateSubscriptionParameters,
        callback: Callable[..., Any],
        session_id: ua.NodeId,
        request_callback: Callable[..., Any] | None = None,
    ) -> ua.CreateSubscriptionResult:
        if not params.RequestedPublishingInterval >= floor_ms:  # NaN too
            params.RequestedPublishingInterval = floor_ms
        return await create(params, callback, session_id, request_callback)

    setattr(service, "create_subscription", create_subscription)  # noqa: B010 - replacing a bound method


# asyncua's annotations ask for its own int/str subclasses (ua.Int32, ua.String, ...).
def _nid(ident: str | int, ns: int = 0) -> ua.NodeId:
    if isinstance(ident, str):
        return ua.NodeId(ua.String(ident), ua.Int16(ns))
    return ua.NodeId(ua.Int32(ident), ua.Int16(ns))


def _status(code: int) -> ua.StatusCode:
    return ua.StatusCode(ua.UInt32(code))


def _argument(name: str, vtype: ua.VariantType, doc: str, *, array: bool = False) -> ua.Argument:
    arg = ua.Argument()
    arg.Name = name
    arg.DataType = _nid(vtype.value)
    arg.ValueRank = ua.ValueRank.OneDimension if array else ua.ValueRank.Scalar
    arg.ArrayDimensions = [0] if array else []
    arg.Description = ua.LocalizedText(doc)
    return arg


# ---------------------------------------------------------------------------------- the server


class OpcUaSink:
    """The bridge's OPC UA server (``Sink`` of pipeline.bridge.model)."""

    name = "opcua"

    def __init__(self, *, cfg: OpcUaConfig, commands: PlantCommands) -> None:
        if not isinstance(cfg, OpcUaConfig):
            raise TypeError(f"cfg must be OpcUaConfig, got {type(cfg).__name__}")
        check_config(cfg)
        self._cfg = cfg
        self._commands = commands
        self._server: Server | None = None
        self._ns = 0
        self._gen: EventGenerator | None = None
        self._vars: dict[str, tuple[ua.NodeId, ua.VariantType]] = {}
        self._written: dict[str, Any] = {}
        self._states: dict[str, ua.NodeId] = {}
        self._cameras: set[str] = set()
        self._cameras_node: Node | None = None
        self._latest: deque[str] = deque(maxlen=cfg.latest_results)
        self._ratelog = RateLimitedLog(log, interval_s=10.0)
        self._trust_dirs: tuple[Path, ...] = ()
        self._trust_seen: tuple[tuple[str, int, int], ...] | None = None
        self._events = 0
        self._sessions = 0
        self._refused = 0
        self._method_calls = 0
        self._method_errors = 0

    # -------------------------------------------------------------------------------- life

    async def start(self) -> None:
        cfg = self._cfg
        # asyncua logs every request at INFO; its trust store logs a traceback for each untrusted
        # certificate, which the gate reports here in one line instead.
        logging.getLogger("asyncua").setLevel(logging.WARNING)
        logging.getLogger("asyncuagds").setLevel(logging.CRITICAL)
        trust, app_uri, cert_files = await self._load_security()
        gate = SessionGate(
            users_file=cfg.users_file,
            allow_anonymous=cfg.allow_anonymous,
            trust=trust,
            require_certificate=not cfg.allow_insecure,
            on_refused=self._session_refused,
            on_accepted=self._session_accepted,
        )
        server = Server(user_manager=gate)
        await server.init()
        server.set_endpoint(cfg.endpoint)
        server.set_server_name("stripinspect bridge")
        server.product_uri = "urn:stripinspect"
        server.manufacturer_name = "stripinspect"
        await server.set_application_uri(app_uri)
        policies: list[ua.SecurityPolicyType] = []
        if cert_files is not None and trust is not None:
            await server.load_certificate(str(cert_files[0]))
            await server.load_private_key(str(cert_files[1]))
            policies.append(ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt)
            options = (
                CertificateValidatorOptions.TIME_RANGE
                | CertificateValidatorOptions.URI
                | CertificateValidatorOptions.TRUSTED
                | CertificateValidatorOptions.REVOKED
                | CertificateValidatorOptions.PEER_CLIENT
            )
            server.set_certificate_validator(self._validator(CertificateValidator(options, trust), trust))
        if cfg.allow_insecure:
            policies.append(ua.SecurityPolicyType.NoSecurity)
        server.set_security_policy(policies)
        tokens: list[type] = []
        if cfg.users_file is not None:
            tokens.append(ua.UserNameIdentityToken)
        if cfg.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        await self._build(server)
        clamp_publishing_interval(server, float(cfg.publishing_interval_ms))
        try:
            await server.start()
        except OSError as err:
            raise OpcUaError(f"opcua: cannot listen on {cfg.endpoint}: {err.strerror or err}") from None
        self._server = server
        log.info(
            "opcua: serving %s (%s), users %s, anonymous %s",
            cfg.endpoint,
            ", ".join(p.name for p in policies),
            cfg.users_file,
            cfg.allow_anonymous,
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await server.stop()
        # asyncua keeps a session's subscriptions polling after its connection closed, stop()
        # included (OPC 10000-4 §6.7 lets a client take them over on a new channel); with the
        # server gone nobody can.
        subscriptions = server.iserver.subscription_service
        await subscriptions.delete_subscriptions(list(subscriptions.subscriptions))
        log.info("opcua: stopped (%s)", self.counters())

    async def _load_security(self) -> tuple[TrustStore | None, str, tuple[Path, Path] | None]:
        """(trust store, application URI, (server certificate, key)) from ``certs_dir``."""
        cfg = self._cfg
        if cfg.users_file is not None and not Path(cfg.users_file).is_file():
            raise OpcUaError(
                f"opcua users file not found: {cfg.users_file} "
                "(make it with `stripinspect keys --opcua-user NAME --users-file FILE`)"
            )
        if cfg.users_file is not None:
            try:
                users = load_users(Path(cfg.users_file))
            except certs.CertsError as err:
                raise OpcUaError(f"opcua: {err}") from None
            if not users and not cfg.allow_anonymous:
                raise OpcUaError(f"opcua: no users in {cfg.users_file}: nobody could log in")
        if cfg.certs_dir is None:
            return None, certs.SERVER_APP_URI, None
        base = Path(cfg.certs_dir)
        cert_path, key_path = base / certs.SERVER_CERT, base / certs.SERVER_KEY
        for path in (cert_path, key_path):
            if not path.is_file():
                raise OpcUaError(f"opcua: {path} not found (make it with `stripinspect keys --opcua {base}`)")
        try:
            cert = certs.load_certificate(cert_path)
        except certs.CertsError as err:
            raise OpcUaError(f"opcua: {err}") from None
        app_uri = certs.certificate_app_uri(cert)
        if app_uri is None:
            raise OpcUaError(f"opcua: {cert_path} carries no application URI (subjectAltName URI)")
        trusted = base / certs.TRUSTED
        has_trusted = trusted.is_dir() and any(p.suffix.lower() in (".der", ".pem") for p in trusted.iterdir())
        if not has_trusted and not cfg.allow_insecure:
            raise OpcUaError(f"opcua: no client certificates in {trusted}: no client could connect")
        revoked = base / certs.REVOKED
        self._trust_dirs = (trusted, revoked)
        trust = TrustStore([trusted] if trusted.is_dir() else [], [revoked] if revoked.is_dir() else [])
        try:
            await self._reload_trust(trust)
        except (OSError, ValueError) as err:
            raise OpcUaError(f"opcua: cannot load {trusted} or {revoked}: {err}") from None
        return trust, app_uri, (cert_path, key_path)

    def _trust_files(self) -> tuple[tuple[str, int, int], ...]:
        return tuple(
            sorted(
                (str(p), st.st_mtime_ns, st.st_size)
                for d in self._trust_dirs
                if d.is_dir()
                for p in d.iterdir()
                for st in (p.stat(),)
            )
        )

    async def _reload_trust(self, trust: TrustStore) -> None:
        """Read trusted/ and revoked/ again when a file there changed: a certificate copied in (or
        removed) counts from the next session on, without a restart."""
        files = self._trust_files()
        if files != self._trust_seen:
            await trust.load()
            if self._trust_seen is not None:
                log.info("opcua: trusted and revoked certificates reloaded (%d files)", len(files))
            self._trust_seen = files

    def _validator(
        self, validator: CertificateValidator, trust: TrustStore
    ) -> Callable[[x509.Certificate, ua.ApplicationDescription], Any]:
        async def validate(cert: x509.Certificate, app: ua.ApplicationDescription) -> None:
            try:
                await self._reload_trust(trust)
            except (OSError, ValueError) as err:
                self._ratelog.error("trust", "opcua: cannot reload trusted certificates, keeping those before: %s", err)
            try:
                await validator.validate(cert, app)
            except ServiceError as err:
                reason = _status(err.code).name
                self._session_refused(
                    f"cert:{reason}", f"client {app.ApplicationUri!r} ({cert.subject.rfc4514_string()}): {reason}"
                )
                raise

        return validate

    def _session_refused(self, key: str, what: str) -> None:
        self._refused += 1
        self._ratelog.warning(f"refused:{key}", "opcua: refused %s", what)

    def _session_accepted(self) -> None:
        self._sessions += 1

    def counters(self) -> dict[str, int]:
        return {
            "events": self._events,
            "sessions": self._sessions,
            "sessions_refused": self._refused,
            "method_calls": self._method_calls,
            "method_errors": self._method_errors,
        }

    # ----------------------------------------------------------------------- address space

    def _id(self, path: str) -> ua.NodeId:
        return _nid(f"{ROOT}.{path}" if path else ROOT, self._ns)

    def _qn(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self._ns)

    async def _object(self, parent: Node, path: str, objecttype: ua.NodeId | None = None) -> Node:
        name = path.rsplit(".", 1)[-1] if path else ROOT
        if objecttype is None:
            return await parent.add_object(self._id(path), self._qn(name))
        return await parent.add_object(
            self._id(path), self._qn(name), objecttype=objecttype, instantiate_optional=False
        )

    async def _var(self, parent: Node, path: str, value: Any, vtype: ua.VariantType, doc: str) -> Node:
        node = await parent.add_variable(self._id(path), self._qn(path.rsplit(".", 1)[-1]), value, varianttype=vtype)
        await node.write_attribute(ua.AttributeIds.Description, ua.DataValue(ua.Variant(ua.LocalizedText(doc))))
        self._vars[path] = (node.nodeid, vtype)
        self._written[path] = value
        return node

    async def _method(
        self,
        parent: Node,
        path: str,
        func: Callable[..., Any],
        inputs: list[ua.Argument],
        outputs: list[ua.Argument],
        doc: str,
    ) -> None:
        node = await parent.add_method(self._id(path), self._qn(path.rsplit(".", 1)[-1]), func, inputs, outputs)
        await node.write_attribute(ua.AttributeIds.Description, ua.DataValue(ua.Variant(ua.LocalizedText(doc))))

    async def _build(self, server: Server) -> None:
        ns = self._ns = await server.register_namespace(NAMESPACE_URI)
        base_object = server.get_node(ua.ObjectIds.BaseObjectType)
        fsm = server.get_node(ua.ObjectIds.FiniteStateMachineType)

        async def object_type(parent: Node, name: str) -> ua.NodeId:
            node = await parent.add_object_type(_nid(name, ns), self._qn(name))
            return node.nodeid

        vs_type = await object_type(base_object, "VisionSystemType")
        vsm_type = await object_type(fsm, "VisionStateMachineType")
        auto_type = await object_type(fsm, "VisionAutomaticModeStateMachineType")
        recipe_type = await object_type(base_object, "RecipeManagementType")
        result_type = await object_type(base_object, "ResultManagementType")
        event_type = await server.get_node(ua.ObjectIds.BaseEventType).add_object_type(
            _nid("ResultReadyEventType", ns), self._qn("ResultReadyEventType")
        )
        for f in RESULT_FIELDS:
            await event_type.add_property(
                _nid(f"ResultReadyEventType.{f.name}", ns),
                self._qn(f.name),
                ua.get_default_value(f.vtype),
                f.vtype,
            )

        vs = await self._object(server.nodes.objects, "", vs_type)
        await self._var(vs, "LineState", "unknown", _S, "the line's state: worst camera's daemon state")
        await self._var(vs, "Drift", False, _B, "some camera reports drift (Operational, results less certain)")

        # State machines: CurrentState (LocalizedText) with Id (the state object) and Number.
        vsm = await self._object(vs, "VisionStateMachine", vsm_type)
        auto = await self._object(vsm, "VisionStateMachine.AutomaticModeStateMachine", auto_type)
        for machine, prefix, states in (
            (vsm, "VisionStateMachine", VISION_STATES),
            (auto, "VisionStateMachine.AutomaticModeStateMachine", AUTOMATIC_STATES),
        ):
            self._vars[f"{prefix}.CurrentState"] = (self._id(f"{prefix}.CurrentState"), ua.VariantType.LocalizedText)
            self._vars[f"{prefix}.CurrentState.Id"] = (self._id(f"{prefix}.CurrentState.Id"), ua.VariantType.NodeId)
            current = server.get_node(self._id(f"{prefix}.CurrentState"))
            number = await current.add_property(
                self._id(f"{prefix}.CurrentState.Number"), ua.QualifiedName("Number", 0), 0, ua.VariantType.UInt32
            )
            self._vars[f"{prefix}.CurrentState.Number"] = (number.nodeid, ua.VariantType.UInt32)
            for state, no in states.items():
                node = await self._object(machine, f"{prefix}.{state}", _nid(ua.ObjectIds.StateType))
                await (await node.get_child("0:StateNumber")).write_value(ua.Variant(no, ua.VariantType.UInt32))
                self._states[state] = node.nodeid

        bridge = await self._object(vs, "Bridge")
        await self._var(bridge, "Bridge.Heartbeat", 0, ua.VariantType.UInt32, "changes with every status (mod 2^32)")
        await self._var(bridge, "Bridge.Defects", 0, _I, "last BridgeSeq issued")
        await self._var(bridge, "Bridge.StatusTime", 0.0, _D, "Unix s of the last status")
        await self._var(bridge, "Bridge.QueueDrops", "{}", _S, "JSON: messages dropped per protocol queue")
        self._cameras_node = await vs.add_folder(self._id("Cameras"), self._qn("Cameras"))

        recipes = await self._object(vs, "RecipeManagement", recipe_type)
        await self._var(recipes, "RecipeManagement.ActiveRecipe", "", _S, "recipe in force, '' when cameras differ")
        await self._var(recipes, "RecipeManagement.Recipes", [], _S, "recipes every camera knows")
        await self._method(
            recipes,
            "RecipeManagement.GetRecipeList",
            self._get_recipe_list,
            [],
            [_argument("Recipes", _S, "recipes every camera knows", array=True)],
            "Ask the line for its recipes; also refreshes ActiveRecipe and Recipes.",
        )
        await self._method(
            recipes,
            "RecipeManagement.ActivateRecipe",
            self._activate_recipe,
            [_argument("Name", _S, "recipe name (GetRecipeList)")],
            [],
            "Select the recipe on every camera.",
        )

        results = await self._object(vs, "ResultManagement", result_type)
        await self._var(results, "ResultManagement.LatestResults", [], _S, "JSON of the latest results, newest first")
        await self._var(results, "ResultManagement.LastResultId", "", _S, "ResultId of the newest result")
        await self._var(results, "ResultManagement.LastBridgeSeq", 0, _I, "BridgeSeq of the newest result")

        coil = await self._object(vs, "CoilManagement")
        await self._method(
            coil,
            "CoilManagement.CoilStart",
            self._coil_start,
            [
                _argument("CoilId", _S, "coil id"),
                _argument("Grade", _S, "steel grade (a grade the line knows)"),
                _argument("WidthMm", _D, "strip width in mm, 0: unknown"),
                _argument("ThicknessMm", _D, "strip thickness in mm, 0: unknown"),
                _argument("LengthM", _D, "coil length in m, 0: unknown"),
            ],
            [],
            "A new coil enters the line.",
        )
        await self._method(
            coil, "CoilManagement.CoilEnd", self._coil_end, [_argument("CoilId", _S, "coil id")], [], "The coil's tail."
        )
        await self._var(coil, "CoilManagement.CurrentCoilId", "", _S, "coil under the cameras ('' none)")
        await self._var(coil, "CoilManagement.LastCoilId", "", _S, "coil of the latest coil message")
        await self._var(coil, "CoilManagement.LastKind", "", _S, "start, end, grading, periodic or closed")
        await self._var(coil, "CoilManagement.LastMessage", "", _S, "JSON of the latest coil message")
        await self._var(coil, "CoilManagement.LastMessageTime", 0.0, _D, "Unix s the bridge got it")
        await self._var(coil, "CoilManagement.GradingCoilId", "", _S, "coil of the latest live grading")
        await self._var(coil, "CoilManagement.GradingDisposition", "", _S, "its live disposition")
        await self._var(coil, "CoilManagement.ClosedCoilId", "", _S, "latest closed coil")
        await self._var(coil, "CoilManagement.ClosedDisposition", "", _S, "its final disposition")
        await self._var(coil, "CoilManagement.ClosedLengthM", 0.0, _D, "its length in m")

        # Results come from VisionSystem; a HasNotifier from Server lets event browsers find it,
        # and each event is fired from Server too for clients that watch only Server.
        self._gen = await server.get_event_generator(event_type, vs.nodeid)
        await server.nodes.server.add_reference(vs.nodeid, ua.ObjectIds.HasNotifier)
        await self._write_state(server, vision_state("unknown"))

    async def _add_camera(self, server: Server, camera_id: str) -> None:
        assert self._cameras_node is not None
        base = f"Cameras.{camera_id}"
        cam = await self._cameras_node.add_object(self._id(base), self._qn(camera_id))
        await self._var(cam, f"{base}.State", "unknown", _S, "daemon state")
        await self._var(cam, f"{base}.Online", False, _B, "camera delivers frames")
        await self._var(cam, f"{base}.Recipe", "", _S, "recipe in force")
        await self._var(cam, f"{base}.CoilId", "", _S, "coil under this camera")
        await self._var(cam, f"{base}.MdM", 0.0, _D, "m from the coil head")
        await self._var(cam, f"{base}.Frames", 0, _I, "frames inspected")
        await self._var(cam, f"{base}.Alerts", 0, _I, "alerts published")
        await self._var(cam, f"{base}.Drops", 0, _I, "frames dropped")
        await self._var(cam, f"{base}.HeartbeatTime", 0.0, _D, "Unix s of the daemon's heartbeat")
        self._cameras.add(camera_id)

    # ---------------------------------------------------------------------------- writing

    async def _set(self, server: Server, path: str, value: Any) -> None:
        """Write a variable when its value changed (every write notifies monitored items)."""
        if self._written.get(path, _UNSET) == value:
            return
        nodeid, vtype = self._vars[path]
        now = ua.DateTime.now(UTC)
        await server.write_attribute_value(
            nodeid, ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now)
        )
        self._written[path] = value

    async def _write_state(self, server: Server, vs: VisionState) -> None:
        for prefix, state, number in (
            ("VisionStateMachine", vs.state, vs.number),
            ("VisionStateMachine.AutomaticModeStateMachine", vs.automatic, vs.automatic_number),
        ):
            await self._set(server, f"{prefix}.CurrentState", ua.LocalizedText(state, "en"))
            await self._set(server, f"{prefix}.CurrentState.Id", self._states.get(state, ua.NodeId()))
            await self._set(server, f"{prefix}.CurrentState.Number", number)
        await self._set(server, "Drift", vs.drift)

    # ------------------------------------------------------------------------------- Sink

    async def defect(self, d: PlantDefect) -> None:
        server, gen = self._server, self._gen
        if server is None or gen is None:
            raise RuntimeError("OpcUaSink.defect before start")
        ev = gen.event
        for f in RESULT_FIELDS:
            setattr(ev, f.name, f.value(d))
        ev.Severity = result_severity(d)
        # The event first: it is what the plant waits for; the variables follow.
        await gen.trigger(datetime.fromtimestamp(d.capture_time, tz=UTC), result_message(d))
        vision_node = ev.emitting_node
        ev.emitting_node = _nid(ua.ObjectIds.Server)
        try:
            await server.iserver.subscription_service.trigger_event(ev)
        finally:
            ev.emitting_node = vision_node
        self._events += 1
        self._latest.appendleft(result_json(d))
        await self._set(server, "ResultManagement.LatestResults", list(self._latest))
        await self._set(server, "ResultManagement.LastResultId", result_id(d))
        await self._set(server, "ResultManagement.LastBridgeSeq", d.bridge_seq)

    async def status(self, s: LineStatus) -> None:
        server = self._server
        if server is None:
            raise RuntimeError("OpcUaSink.status before start")
        await self._set(server, "LineState", s.state)
        await self._write_state(server, vision_state(s.state))
        await self._set(server, "Bridge.Heartbeat", s.heartbeat % 2**32)
        await self._set(server, "Bridge.Defects", s.defects)
        await self._set(server, "Bridge.StatusTime", s.time)
        await self._set(server, "Bridge.QueueDrops", json.dumps(s.drops, sort_keys=True))
        await self._set(server, "CoilManagement.CurrentCoilId", s.coil_id or "")
        await self._set(server, "RecipeManagement.ActiveRecipe", s.recipe or "")
        await self._set(server, "RecipeManagement.Recipes", common_recipes(s.cameras))
        for cam in s.cameras:
            if cam.camera_id not in self._cameras:
                await self._add_camera(server, cam.camera_id)
            base = f"Cameras.{cam.camera_id}"
            await self._set(server, f"{base}.State", cam.state)
            await self._set(server, f"{base}.Online", cam.camera_online)
            await self._set(server, f"{base}.Recipe", cam.recipe or "")
            await self._set(server, f"{base}.CoilId", cam.coil_id or "")
            await self._set(server, f"{base}.MdM", cam.md_m if cam.md_m is not None else 0.0)
            await self._set(server, f"{base}.Frames", cam.frames)
            await self._set(server, f"{base}.Alerts", cam.alerts)
            await self._set(server, f"{base}.Drops", cam.drops)
            await self._set(server, f"{base}.HeartbeatTime", cam.heartbeat_time)

    async def coil(self, c: PlantCoil) -> None:
        server = self._server
        if server is None:
            raise RuntimeError("OpcUaSink.coil before start")
        await self._set(server, "CoilManagement.LastCoilId", c.coil_id)
        await self._set(server, "CoilManagement.LastKind", c.kind)
        await self._set(server, "CoilManagement.LastMessage", json.dumps(c.to_json(), default=str))
        await self._set(server, "CoilManagement.LastMessageTime", time.time())
        disposition = c.data.get("disposition")
        if c.kind == "grading" and isinstance(disposition, str):
            await self._set(server, "CoilManagement.GradingCoilId", c.coil_id)
            await self._set(server, "CoilManagement.GradingDisposition", disposition)
        if c.kind == "closed":
            length = c.data.get("length_m")
            await self._set(server, "CoilManagement.ClosedCoilId", c.coil_id)
            await self._set(
                server, "CoilManagement.ClosedDisposition", disposition if isinstance(disposition, str) else ""
            )
            await self._set(
                server, "CoilManagement.ClosedLengthM", float(length) if isinstance(length, int | float) else 0.0
            )

    # ---------------------------------------------------------------------------- methods

    def _bad_argument(self, method: str, err: ValueError) -> ua.StatusCode:
        self._method_errors += 1
        self._ratelog.warning(f"args:{method}", "opcua: %s refused: %s", method, err)
        return _status(ua.StatusCodes.BadInvalidArgument)

    async def _run(self, method: str, call: Callable[[], CommandResult]) -> ua.StatusCode | None:
        """Run a blocking line command; a Bad status when the line refused it or failed."""
        try:
            result = await asyncio.to_thread(call)
        except Exception:
            # Whatever the line's client raises, the plant gets an answer and the log the traceback.
            self._method_errors += 1
            log.exception("opcua: %s failed", method)
            return _status(ua.StatusCodes.BadInternalError)
        if not result.ok:
            self._method_errors += 1
            log.warning("opcua: %s refused by the line: %s", method, result.error)
            return _status(ua.StatusCodes.BadInvalidArgument)
        log.info("opcua: %s done", method)
        return None

    @staticmethod
    def _values(args: Sequence[Any], n: int) -> list[Any]:
        if len(args) != n:
            raise ValueError(f"expected {n} arguments, got {len(args)}")
        return [a.Value if isinstance(a, ua.Variant) else a for a in args]

    async def _get_recipe_list(self, parent: ua.NodeId, *args: Any) -> list[ua.Variant] | ua.StatusCode:
        self._method_calls += 1
        try:
            self._values(args, 0)
        except ValueError as err:
            return self._bad_argument("GetRecipeList", err)
        try:
            names, active = await asyncio.to_thread(self._commands.recipes)
        except Exception:
            # As in _run: the plant gets an answer, the log the traceback.
            self._method_errors += 1
            log.exception("opcua: GetRecipeList failed")
            return _status(ua.StatusCodes.BadInternalError)
        server = self._server
        if server is not None:
            await self._set(server, "RecipeManagement.Recipes", list(names))
            await self._set(server, "RecipeManagement.ActiveRecipe", active or "")
        return [ua.Variant(list(names), ua.VariantType.String)]

    async def _activate_recipe(self, parent: ua.NodeId, *args: Any) -> list[ua.Variant] | ua.StatusCode:
        self._method_calls += 1
        try:
            (raw,) = self._values(args, 1)
            name = text_arg(raw, "Name")
        except ValueError as err:
            return self._bad_argument("ActivateRecipe", err)
        bad = await self._run(f"ActivateRecipe({name!r})", lambda: self._commands.select_recipe(name))
        if bad is not None:
            return bad
        if self._server is not None:
            await self._set(self._server, "RecipeManagement.ActiveRecipe", name)
        return []

    async def _coil_start(self, parent: ua.NodeId, *args: Any) -> list[ua.Variant] | ua.StatusCode:
        self._method_calls += 1
        try:
            coil_id, grade, width, thickness, length = self._values(args, 5)
            coil_id, grade = text_arg(coil_id, "CoilId"), text_arg(grade, "Grade")
            width_mm, thickness_mm = size_arg(width, "WidthMm"), size_arg(thickness, "ThicknessMm")
            length_m = size_arg(length, "LengthM")
        except ValueError as err:
            return self._bad_argument("CoilStart", err)
        bad = await self._run(
            f"CoilStart({coil_id!r}, {grade!r})",
            lambda: self._commands.coil_start(
                coil_id=coil_id, grade=grade, width_mm=width_mm, thickness_mm=thickness_mm, length_m=length_m
            ),
        )
        return bad if bad is not None else []

    async def _coil_end(self, parent: ua.NodeId, *args: Any) -> list[ua.Variant] | ua.StatusCode:
        self._method_calls += 1
        try:
            (raw,) = self._values(args, 1)
            coil_id = text_arg(raw, "CoilId")
        except ValueError as err:
            return self._bad_argument("CoilEnd", err)
        bad = await self._run(f"CoilEnd({coil_id!r})", lambda: self._commands.coil_end(coil_id=coil_id))
        return bad if bad is not None else []


_UNSET = object()
