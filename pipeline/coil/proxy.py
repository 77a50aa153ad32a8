"""Fan-in of the camera daemons' PUB streams: one XSUB/XPUB proxy (the zguide's "dynamic
discovery" proxy, ``zmq.proxy``). The XSUB side connects to every camera's PUB endpoint, the
XPUB side binds one endpoint where the coil service, the plant bridge and the operator station
subscribe; their subscriptions travel upstream, so each camera only sends what someone wants.

Messages are forwarded unchanged: each keeps its camera's ``camera_id`` and per-camera ``seq``,
so a subscriber still sees each camera's gaps and fetches them from that camera's journal.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import zmq

from pipeline.errors import StripinspectError

# Messages queued per subscriber in the proxy (and per camera on its input side): a coil's
# worth of alerts and frames of several cameras, far more than one camera's own send_hwm.
PROXY_HWM = 200_000


class ProxyError(StripinspectError):
    """The proxy cannot bind or connect; one line naming the endpoint."""


class StreamProxy:
    """``start()`` runs ``zmq.proxy_steerable`` on its own thread; ``stop()`` terminates it
    through the control socket and closes everything (idempotent)."""

    def __init__(self, *, context: zmq.Context, cameras: Sequence[str], endpoint: str) -> None:
        if not cameras:
            raise ProxyError("no camera PUB endpoints to proxy (coil.cameras is empty)")
        self._context = context
        self._xsub = context.socket(zmq.XSUB)
        self._xpub = context.socket(zmq.XPUB)
        ctrl_name = f"inproc://stripinspect-proxy-{id(self)}"
        self._ctrl = context.socket(zmq.PAIR)
        self._ctrl_peer = context.socket(zmq.PAIR)
        for s in (self._xsub, self._xpub, self._ctrl, self._ctrl_peer):
            s.setsockopt(zmq.LINGER, 0)
        self._xsub.setsockopt(zmq.RCVHWM, PROXY_HWM)
        self._xpub.setsockopt(zmq.SNDHWM, PROXY_HWM)
        try:
            self._ctrl.bind(ctrl_name)
            self._ctrl_peer.connect(ctrl_name)
            for pub in cameras:
                try:
                    self._xsub.connect(pub)
                except zmq.ZMQError as err:
                    raise ProxyError(f"cannot connect to camera PUB {pub}: {err}") from None
            try:
                self._xpub.bind(endpoint)
            except zmq.ZMQError as err:
                raise ProxyError(f"coil.proxy_endpoint = {endpoint}: cannot bind: {err}") from None
        except ProxyError:
            self._close()
            raise
        self.endpoint = self._xpub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread: threading.Thread | None = None
        self.failed: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stripinspect-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            zmq.proxy_steerable(self._xsub, self._xpub, None, self._ctrl)
        except zmq.ZMQError as err:
            if err.errno != zmq.ETERM:
                self.failed = err

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._ctrl_peer.send(b"TERMINATE")
            self._thread.join(5.0)
        self._close()

    def _close(self) -> None:
        for s in (self._xsub, self._xpub, self._ctrl, self._ctrl_peer):
            s.close(0)
