"""OPC UA certificates and users: real RSA keys and scrypt hashes in tmp_path."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from pipeline.bridge import certs
from pipeline.transport import users as userfile


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pki")
    certs.create_opcua_keys(out, clients=["plc", "mes"], hostname="10.1.2.3")
    return out


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_names_the_application_and_host(keys: Path) -> None:
    cert = certs.load_certificate(keys / certs.SERVER_CERT)
    assert certs.certificate_app_uri(cert) == certs.SERVER_APP_URI
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.1.2.3") in san.get_values_for_type(x509.IPAddress)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.content_commitment and usage.key_encipherment and usage.data_encipherment
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey) and public.key_size == certs.KEY_BITS
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days >= 3650
    assert _mode(keys / certs.SERVER_KEY) == 0o600


def test_each_client_gets_a_trusted_certificate_and_a_private_key(keys: Path) -> None:
    for name in ("plc", "mes"):
        cert_path, key_path = certs.client_files(keys, name)
        cert = certs.load_certificate(cert_path)
        assert certs.certificate_app_uri(cert) == certs.client_app_uri(name)
        assert (keys / certs.TRUSTED / cert_path.name).read_bytes() == cert_path.read_bytes()
        assert _mode(key_path) == 0o600
        key = load_pem_private_key(key_path.read_bytes(), password=None)
        public = cert.public_key()
        assert isinstance(key, rsa.RSAPrivateKey) and isinstance(public, rsa.RSAPublicKey)
        assert key.public_key().public_numbers() == public.public_numbers()
    assert not any(p.name.endswith("_key.pem") for p in (keys / certs.TRUSTED).iterdir())


def test_adding_a_client_keeps_the_server_certificate(tmp_path: Path) -> None:
    certs.create_opcua_keys(tmp_path, clients=["a"])
    server = (tmp_path / certs.SERVER_CERT).read_bytes()
    certs.create_opcua_keys(tmp_path, clients=["b"])
    assert (tmp_path / certs.SERVER_CERT).read_bytes() == server
    assert sorted(p.name for p in (tmp_path / certs.TRUSTED).iterdir()) == ["a_cert.der", "b_cert.der"]
    with pytest.raises(certs.CertsError, match="already has a certificate"):
        certs.create_opcua_keys(tmp_path, clients=["a"])


@pytest.mark.parametrize("name", ["", "../x", "a b", "x" * 65, "-lead"])
def test_bad_client_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(certs.CertsError, match="client"):
        certs.create_opcua_keys(tmp_path, clients=[name])
    assert not (tmp_path / certs.SERVER_CERT).exists()


def test_users_are_stored_as_scrypt_hashes_readable_by_the_owner_only(tmp_path: Path) -> None:
    users = tmp_path / "users"
    userfile.add_user(users, "op1", "correct horse")
    userfile.add_user(users, "op2", "battery staple")
    assert _mode(users) == 0o600
    text = users.read_text()
    assert "correct horse" not in text and "battery staple" not in text
    assert userfile.verify_user(users, "op1", "correct horse")
    assert userfile.verify_user(users, "op2", "battery staple")
    assert not userfile.verify_user(users, "op1", "battery staple")
    assert not userfile.verify_user(users, "nobody", "correct horse")
    # Same password, different salt: equal hashes would tell who shares a password.
    userfile.add_user(users, "op3", "correct horse")
    loaded = userfile.load_users(users)
    assert loaded["op1"].digest != loaded["op3"].digest


def test_adding_a_user_again_changes_the_password(tmp_path: Path) -> None:
    users = tmp_path / "users"
    userfile.add_user(users, "op", "first password")
    userfile.add_user(users, "op", "second password")
    assert list(userfile.load_users(users)) == ["op"]
    assert userfile.verify_user(users, "op", "second password")
    assert not userfile.verify_user(users, "op", "first password")


def test_short_passwords_and_bad_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(certs.CertsError, match="password"):
        userfile.add_user(tmp_path / "users", "op", "short")
    with pytest.raises(certs.CertsError, match="user"):
        userfile.add_user(tmp_path / "users", "op:x", "long enough")
    assert not (tmp_path / "users").exists()


def test_a_damaged_users_file_names_the_line(tmp_path: Path) -> None:
    users = tmp_path / "users"
    userfile.add_user(users, "op", "correct horse")
    users.write_text(users.read_text() + "mallory:plain:secret\n")
    with pytest.raises(certs.CertsError, match=r"users:3: expected"):
        userfile.load_users(users)
    line = userfile.hash_password("op", "correct horse").line().split(":")
    line[2] = str(2**30)  # a tampered cost would make every login allocate gigabytes
    users.write_text(":".join(line) + "\n")
    with pytest.raises(certs.CertsError, match="out of bounds"):
        userfile.load_users(users)
