"""The client side of a control socket: one JSON request, one JSON reply."""

from __future__ import annotations

import json
from typing import Any

import zmq

from pipeline.transport.security import secure_client


def request(
    context: zmq.Context,
    endpoint: str,
    msg: dict[str, Any],
    *,
    timeout_s: float,
    keys: Any = None,
) -> dict[str, Any]:
    """One request to a control socket (a daemon's or the coil service's) on a fresh REQ socket
    (a REQ socket whose reply never came cannot be used again: the zguide's Lazy Pirate).
    ``keys``: a ``ClientKeys`` where the server uses CURVE. Raises TimeoutError."""
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    if keys is not None:
        secure_client(sock, client_key=keys.client_key, server_key=keys.server_key)
    try:
        sock.connect(endpoint)
        sock.send(json.dumps(msg).encode())
        reply = sock.recv_json()
    except zmq.Again:
        raise TimeoutError(f"{endpoint}: no reply to {msg.get('cmd')!r} within {timeout_s} s") from None
    finally:
        sock.close(0)
    if not isinstance(reply, dict):
        raise TimeoutError(f"{endpoint}: reply is not a JSON object")
    return reply
