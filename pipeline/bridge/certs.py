"""Certificates and users of the OPC UA server (`stripinspect keys --opcua DIR`, `--opcua-user FILE`).

Certificates folder (``create_opcua_keys`` writes one):

    DIR/server_cert.der, DIR/server_key.pem     the bridge's application instance certificate
    DIR/clients/<name>_cert.der, <name>_key.pem  one per client (PLC, MES, SCADA): hand both to it
    DIR/trusted/*.der                            the client certificates the server accepts
    DIR/revoked/*.der|pem                        certificate revocation lists (optional)

Self-signed X.509 v3, RSA 2048, SHA-256, ten years: what OPC UA's Basic256Sha256 policy asks of an
application instance certificate (OPC 10000-6 §6.2.2: subjectAltName carries the application URI,
which must equal the ``ApplicationUri`` the application announces). A client made elsewhere (a PLC's
own certificate) is trusted by copying its DER certificate into ``trusted/``.

Users file: one line per user, ``name:scrypt:N:r:p:salt:hash`` (base64), mode 0600. scrypt
(RFC 7914) with N=2^14, r=8, p=1 costs about 50 ms and 16 MiB a login, which is cheap for a
plant client logging in once and dear for anyone guessing.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline.errors import StripinspectError

log = logging.getLogger("stripinspect.bridge.certs")

SERVER_APP_URI = "urn:stripinspect:opcua:bridge"
SERVER_CERT = "server_cert.der"
SERVER_KEY = "server_key.pem"
CLIENTS = "clients"
TRUSTED = "trusted"
REVOKED = "revoked"

KEY_BITS = 2048
VALID_DAYS = 3650
# A PLC's clock may lag the bridge's by hours; a certificate "not yet valid" is refused.
BACKDATE = datetime.timedelta(days=1)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32


class CertsError(StripinspectError):
    """Certificates or users file missing, unreadable or refused; one line."""


def check_name(name: str, what: str = "name") -> str:
    """A client or user name: it becomes a file name and a field of the users file."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CertsError(f"{what} {name!r}: use 1-64 letters, digits, '_', '.', '@', '-' (first a letter or digit)")
    return name


def client_app_uri(name: str) -> str:
    """The application URI of client ``name``: its certificate carries it, and the client must announce it."""
    return f"urn:stripinspect:opcua:client:{check_name(name, 'client')}"


def client_files(certs_dir: Path, name: str) -> tuple[Path, Path]:
    """(certificate, private key) of client ``name`` under ``certs_dir``."""
    check_name(name, "client")
    base = Path(certs_dir) / CLIENTS
    return base / f"{name}_cert.der", base / f"{name}_key.pem"


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, atomically (a half-written key is worse than none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _san(app_uri: str, hostnames: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(app_uri)]
    for host in dict.fromkeys(h for h in hostnames if h):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificate(
    *, common_name: str, app_uri: str, hostnames: list[str], server: bool, days: int = VALID_DAYS
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed OPC UA application instance certificate and its key."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "stripinspect"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(_san(app_uri, hostnames), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # OPC 10000-6 §6.2.2 lists these four usages for an application instance certificate.
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=True,
                data_encipherment=True,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _save(cert: x509.Certificate, key: rsa.RSAPrivateKey, cert_path: Path, key_path: Path) -> None:
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    _write_private(
        key_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def create_opcua_keys(
    out_dir: Path, *, clients: list[str], hostname: str = "127.0.0.1", app_uri: str = SERVER_APP_URI
) -> None:
    """Make the server's certificate (kept when one is there already, so adding a client does not
    invalidate the others' copy of it) and one certificate per new client, trusted by the server.

    ``hostname``: the name or address the clients reach the bridge by (the endpoint's host)."""
    out_dir = Path(out_dir)
    names = [check_name(n, "client") for n in clients]
    if len(set(names)) != len(names):
        raise CertsError(f"client names repeat: {names}")
    for name in names:
        cert_path, _ = client_files(out_dir, name)
        if cert_path.exists():
            raise CertsError(f"client {name!r} already has a certificate in {cert_path.parent}: delete it to renew")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / TRUSTED).mkdir(exist_ok=True)
    server_cert, server_key = out_dir / SERVER_CERT, out_dir / SERVER_KEY
    if server_cert.exists() and server_key.exists():
        log.info("server certificate %s kept", server_cert)
    else:
        # The host's own name too: asyncua (and some clients) compare it with the certificate's names.
        cert, key = make_certificate(
            common_name="stripinspect bridge", app_uri=app_uri, hostnames=[hostname, socket.gethostname()], server=True
        )
        _save(cert, key, server_cert, server_key)
        log.info("server certificate %s written (%s, %s)", server_cert, app_uri, hostname)
    for name in names:
        cert_path, key_path = client_files(out_dir, name)
        cert, key = make_certificate(common_name=name, app_uri=client_app_uri(name), hostnames=[], server=False)
        _save(cert, key, cert_path, key_path)
        (out_dir / TRUSTED / cert_path.name).write_bytes(cert_path.read_bytes())
        log.info("client %s: %s and %s written, trusted", name, cert_path, key_path)


def load_certificate(path: Path) -> x509.Certificate:
    """A DER or PEM certificate; CertsError when missing or unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CertsError(f"cannot read certificate {path}: {err.strerror or err}") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as err:
        raise CertsError(f"{path} is not a certificate: {err}") from None


def certificate_app_uri(cert: x509.Certificate) -> str | None:
    """The application URI in the certificate's subjectAltName, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


# ---------------------------------------------------------------------------------------- users


@dataclass(frozen=True)
class UserRecord:
    """One line of the users file: the scrypt parameters, salt and derived key of a user's password."""

    name: str
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def line(self) -> str:
        b64 = base64.b64encode
        return f"{self.name}:scrypt:{self.n}:{self.r}:{self.p}:{b64(self.salt).decode()}:{b64(self.digest).decode()}"


def _scrypt(password: str, *, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem: 128 * n * r bytes are needed; OpenSSL's default ceiling (32 MiB) is too tight above N=2^14.
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=256 * n * r + 2**20)


def hash_password(name: str, password: str) -> UserRecord:
    """A new record for ``name`` with a random salt."""
    check_name(name, "user")
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise CertsError(f"password of {name!r}: use {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return UserRecord(name=name, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=salt, digest=digest)


def parse_user_line(line: str) -> UserRecord:
    """One line of the users file; ValueError names what is wrong."""
    parts = line.strip().split(":")
    if len(parts) != 7 or parts[1] != "scrypt":
        raise ValueError("expected name:scrypt:N:r:p:salt:hash")
    name, _, n, r, p, salt, digest = parts
    if not NAME_RE.match(name):
        raise ValueError(f"bad user name {name!r}")
    rec = UserRecord(
        name=name,
        n=int(n),
        r=int(r),
        p=int(p),
        salt=base64.b64decode(salt, validate=True),
        digest=base64.b64decode(digest, validate=True),
    )
    # Bounds keep a tampered file from making every login allocate gigabytes.
    if not (2 <= rec.n <= 2**20 and rec.n & (rec.n - 1) == 0 and 1 <= rec.r <= 32 and 1 <= rec.p <= 16):
        raise ValueError("scrypt parameters out of bounds")
    if len(rec.digest) != HASH_BYTES or not rec.salt:
        raise ValueError("bad salt or hash length")
    return rec


def load_users(users_file: Path) -> dict[str, UserRecord]:
    """Every user of the file by name; blank lines and ``#`` comments skipped."""
    users_file = Path(users_file)
    try:
        text = users_file.read_text(encoding="utf-8")
    except OSError as err:
        raise CertsError(f"cannot read users file {users_file}: {err.strerror or err}") from None
    users: dict[str, UserRecord] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            rec = parse_user_line(raw)
        except ValueError as err:
            raise CertsError(f"{users_file}:{no}: {err}") from None
        users[rec.name] = rec
    return users


def add_user(users_file: Path, name: str, password: str) -> None:
    """Add ``name`` (or change its password) in ``users_file``, made with mode 0600 if new."""
    users_file = Path(users_file)
    rec = hash_password(name, password)
    users = load_users(users_file) if users_file.exists() else {}
    users[name] = rec
    body = "# stripinspect OPC UA users: name:scrypt:N:r:p:salt:hash\n"
    body += "".join(u.line() + "\n" for u in users.values())
    _write_private(users_file, body.encode("utf-8"))


# Checked when the user is unknown, so that a wrong name costs as long as a wrong password.
_DUMMY = UserRecord(name="-", n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=b"\0" * SALT_BYTES, digest=b"\0" * HASH_BYTES)


def verify_password(record: UserRecord | None, password: str) -> bool:
    """Whether ``password`` is the one ``record`` was made from (constant time in the digest)."""
    rec = record if record is not None else _DUMMY
    digest = _scrypt(password, salt=rec.salt, n=rec.n, r=rec.r, p=rec.p)
    return record is not None and hmac.compare_digest(digest, rec.digest)


def verify_user(users_file: Path, name: str, password: str) -> bool:
    """Whether ``name`` is in ``users_file`` with ``password``."""
    return verify_password(load_users(users_file).get(name), password)
