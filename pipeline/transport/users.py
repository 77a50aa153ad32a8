"""Who may log in: the users file (scrypt password hashes with a role) and the API tokens file,
shared by the plant bridge (OPC UA users) and the operator station.

Users file: one line per user, ``name:scrypt:N:r:p:salt:hash[:role]`` (salt and hash base64),
mode 0600. scrypt (RFC 7914) with N=2^14, r=8, p=1 costs about 50 ms and 16 MiB a login, which is
cheap for a person or a plant client logging in once and dear for anyone guessing. The role
(``viewer`` or ``operator``) was added for the station; a line without one is an operator, so
the OPC UA users files written before keep working.

Tokens file: one line per token, ``name:role:sha256hex``. Only the SHA-256 of a token is
stored: the token is 32 random bytes, so a hash without salt or stretching is enough (nobody
guesses 256 bits), and a stolen file does not let anyone in.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import StripinspectError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
ROLES = ("viewer", "operator")
DEFAULT_ROLE = "operator"
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
TOKEN_BYTES = 32
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class CredentialsError(StripinspectError):
    """Keys, certificates, users or tokens missing, unreadable or refused; one line."""


def check_name(name: str, what: str = "name") -> str:
    """A client, user or token name: it becomes a file name and a field of the users file."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise CredentialsError(
            f"{what} {name!r}: use 1-64 letters, digits, '_', '.', '@', '-' (first a letter or digit)"
        )
    return name


def check_role(role: str) -> str:
    if role not in ROLES:
        raise CredentialsError(f"role {role!r}: use one of {', '.join(ROLES)}")
    return role


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by the owner only, atomically (a half-written key or users file
    is worse than none)."""
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


# ---------------------------------------------------------------------------------------- users


@dataclass(frozen=True, kw_only=True)
class UserRecord:
    """One line of the users file: the scrypt parameters, salt and derived key of a user's
    password, and the user's role."""

    name: str
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes
    role: str = DEFAULT_ROLE

    def __post_init__(self) -> None:
        check_role(self.role)

    def line(self) -> str:
        b64 = base64.b64encode
        salt, digest = b64(self.salt).decode(), b64(self.digest).decode()
        return f"{self.name}:scrypt:{self.n}:{self.r}:{self.p}:{salt}:{digest}:{self.role}"


def _scrypt(password: str, *, salt: bytes, n: int, r: int, p: int) -> bytes:
    # maxmem: 128 * n * r bytes are needed; OpenSSL's default ceiling (32 MiB) is too tight above N=2^14.
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=HASH_BYTES, maxmem=256 * n * r + 2**20)


def hash_password(name: str, password: str, *, role: str = DEFAULT_ROLE) -> UserRecord:
    """A new record for ``name`` with a random salt."""
    check_name(name, "user")
    check_role(role)
    if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        raise CredentialsError(f"password of {name!r}: use {MIN_PASSWORD} to {MAX_PASSWORD} characters")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P)
    return UserRecord(name=name, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, salt=salt, digest=digest, role=role)


def parse_user_line(line: str) -> UserRecord:
    """One line of the users file; ValueError names what is wrong."""
    parts = line.strip().split(":")
    if len(parts) not in (7, 8) or parts[1] != "scrypt":
        raise ValueError("expected name:scrypt:N:r:p:salt:hash[:role]")
    name, _, n, r, p, salt, digest = parts[:7]
    role = parts[7] if len(parts) == 8 else DEFAULT_ROLE
    if not NAME_RE.match(name):
        raise ValueError(f"bad user name {name!r}")
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    rec = UserRecord(
        name=name,
        n=int(n),
        r=int(r),
        p=int(p),
        salt=base64.b64decode(salt, validate=True),
        digest=base64.b64decode(digest, validate=True),
        role=role,
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
        raise CredentialsError(f"cannot read users file {users_file}: {err.strerror or err}") from None
    users: dict[str, UserRecord] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            rec = parse_user_line(raw)
        except ValueError as err:
            raise CredentialsError(f"{users_file}:{no}: {err}") from None
        users[rec.name] = rec
    return users


def add_user(users_file: Path, name: str, password: str, *, role: str = DEFAULT_ROLE) -> None:
    """Add ``name`` (or change its password and role) in ``users_file``, made with mode 0600 if new."""
    users_file = Path(users_file)
    rec = hash_password(name, password, role=role)
    users = load_users(users_file) if users_file.exists() else {}
    users[name] = rec
    body = "# stripinspect users: name:scrypt:N:r:p:salt:hash:role (role: viewer or operator)\n"
    body += "".join(u.line() + "\n" for u in users.values())
    write_private(users_file, body.encode("utf-8"))


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


# --------------------------------------------------------------------------------------- tokens


@dataclass(frozen=True, kw_only=True)
class TokenRecord:
    """One line of the tokens file: who the token stands for, the role, SHA-256 of the token."""

    name: str
    role: str
    sha256: str

    def __post_init__(self) -> None:
        check_name(self.name, "token")
        check_role(self.role)
        if not _HEX64.match(self.sha256):
            raise CredentialsError(f"token {self.name!r}: sha256 must be 64 lowercase hex digits")

    def line(self) -> str:
        return f"{self.name}:{self.role}:{self.sha256}"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token_line(line: str) -> TokenRecord:
    """One line of the tokens file; ValueError names what is wrong."""
    parts = line.strip().split(":")
    if len(parts) != 3:
        raise ValueError("expected name:role:sha256hex")
    try:
        return TokenRecord(name=parts[0], role=parts[1], sha256=parts[2])
    except CredentialsError as err:
        raise ValueError(str(err)) from None


def load_tokens(tokens_file: Path) -> list[TokenRecord]:
    """Every token of the file; blank lines and ``#`` comments skipped."""
    tokens_file = Path(tokens_file)
    try:
        text = tokens_file.read_text(encoding="utf-8")
    except OSError as err:
        raise CredentialsError(f"cannot read tokens file {tokens_file}: {err.strerror or err}") from None
    out: list[TokenRecord] = []
    for no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        try:
            out.append(parse_token_line(raw))
        except ValueError as err:
            raise CredentialsError(f"{tokens_file}:{no}: {err}") from None
    return out


def add_token(tokens_file: Path, name: str, *, role: str) -> str:
    """A new random token for ``name`` with ``role`` (replacing any token of that name); returns
    the token, which is shown once and stored only as its hash."""
    tokens_file = Path(tokens_file)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    rec = TokenRecord(name=check_name(name, "token"), role=check_role(role), sha256=token_digest(token))
    kept = [t for t in (load_tokens(tokens_file) if tokens_file.exists() else []) if t.name != name]
    body = "# stripinspect API tokens: name:role:sha256hex (role: viewer or operator)\n"
    body += "".join(t.line() + "\n" for t in [*kept, rec])
    write_private(tokens_file, body.encode("utf-8"))
    return token


def find_token(tokens: list[TokenRecord], token: str) -> TokenRecord | None:
    """The record of ``token``; every entry is compared (in constant time), so how long this
    takes does not tell which entry came closest."""
    digest = token_digest(token)
    found = None
    for rec in tokens:
        if hmac.compare_digest(rec.sha256, digest):
            found = rec
    return found
