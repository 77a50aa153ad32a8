"""CURVE encryption and authentication for the daemon's sockets (ZeroMQ RFC 26, zmq.auth).

Keys folder (``stripinspect keys --out DIR`` writes one):

    DIR/server.key, DIR/server.key_secret    the daemon's certificate
    DIR/authorized_clients/*.key             public keys of the clients allowed in
    DIR/clients/<name>.key_secret            client certificates to hand to PLC gateways

A client whose public key is not in ``authorized_clients`` fails the handshake: a subscriber
receives nothing and a control request gets no answer. Certificates are ZeroMQ's text format
(zmq.auth), never pickled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from pipeline.errors import StripinspectError

SERVER = "server"
AUTHORIZED = "authorized_clients"
CLIENTS = "clients"


class SecurityError(StripinspectError):
    """Keys missing or unreadable; one line."""


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise SecurityError(f"key file not found: {path}")
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (ValueError, OSError) as err:
        raise SecurityError(f"cannot read key file {path}: {err}") from None
    if secret and secret_key is None:
        raise SecurityError(f"{path} holds no secret key")
    return public, secret_key


class CurveServer:
    """Runs the ZAP authenticator for ``context`` and makes sockets CURVE servers."""

    def __init__(self, *, context: zmq.Context, keys_dir: Path) -> None:
        if not zmq.has("curve"):
            raise SecurityError("this libzmq has no CURVE support (needs libsodium)")
        keys_dir = Path(keys_dir)
        self.public, secret = _load(keys_dir / f"{SERVER}.key_secret", secret=True)
        assert secret is not None
        self._secret = secret
        authorized = keys_dir / AUTHORIZED
        if not authorized.is_dir() or not any(authorized.glob("*.key")):
            raise SecurityError(f"no client public keys in {authorized}: nobody could connect")
        self._auth = ThreadAuthenticator(context)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=str(authorized))

    def secure(self, sock: zmq.Socket) -> None:
        """Call before bind."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public
        sock.curve_server = True

    def stop(self) -> None:
        self._auth.stop()


def secure_client(sock: zmq.Socket, *, client_key: Path, server_key: Path) -> None:
    """Make ``sock`` a CURVE client with certificate ``client_key`` (a .key_secret file) of the
    server whose public key is in ``server_key``. Call before connect."""
    public, secret = _load(Path(client_key), secret=True)
    server_public, _ = _load(Path(server_key), secret=False)
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


def create_keys(out: Path, clients: list[str]) -> None:
    """A keys folder: the server certificate and one certificate per client, all authorised."""
    out = Path(out)
    for sub in (AUTHORIZED, CLIENTS):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if (out / f"{SERVER}.key_secret").exists():
        raise SecurityError(f"{out} already holds a server certificate; not overwritten")
    zmq.auth.create_certificates(str(out), SERVER)
    for name in clients:
        zmq.auth.create_certificates(str(out / CLIENTS), name)
        shutil.copy(out / CLIENTS / f"{name}.key", out / AUTHORIZED / f"{name}.key")
    (out / f"{SERVER}.key_secret").chmod(0o600)
    for f in (out / CLIENTS).glob("*.key_secret"):
        f.chmod(0o600)
