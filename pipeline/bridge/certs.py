"""Certificates of the OPC UA server (`stripinspect keys --opcua --out DIR`); its users are
those of ``pipeline.transport.users`` (`stripinspect keys --opcua-user NAME --users-file FILE`).

Certificates folder (``create_opcua_keys`` writes one):

    DIR/server_cert.der, DIR/server_key.pem     the bridge's application instance certificate
    DIR/clients/<name>_cert.der, <name>_key.pem  one per client (PLC, MES, SCADA): hand both to it
    DIR/trusted/*.der                            the client certificates the server accepts
    DIR/revoked/*.der|pem                        certificate revocation lists (optional)

Self-signed X.509 v3, RSA 2048, SHA-256, ten years: what OPC UA's Basic256Sha256 policy asks of an
application instance certificate (OPC 10000-6 §6.2.2: subjectAltName carries the application URI,
which must equal the ``ApplicationUri`` the application announces). A client made elsewhere (a PLC's
own certificate) is trusted by copying its DER certificate into ``trusted/``.

Users file: ``pipeline/transport/users.py`` (scrypt hashes, shared with the operator station),
re-exported here for the bridge.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import socket
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Re-exported (``as``): the bridge and its callers keep using them from here.
from pipeline.transport.users import CredentialsError, check_name, write_private

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

# One error for the bridge's credentials: its certificates and the users file it reads beside
# them fail alike (opcua.py catches both with one clause).
CertsError = CredentialsError


def client_app_uri(name: str) -> str:
    """The application URI of client ``name``: its certificate carries it, and the client must announce it."""
    return f"urn:stripinspect:opcua:client:{check_name(name, 'client')}"


def client_files(certs_dir: Path, name: str) -> tuple[Path, Path]:
    """(certificate, private key) of client ``name`` under ``certs_dir``."""
    check_name(name, "client")
    base = Path(certs_dir) / CLIENTS
    return base / f"{name}_cert.der", base / f"{name}_key.pem"


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
    write_private(
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
