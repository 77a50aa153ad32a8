"""Who may see the station and who may change the model: users and tokens, sessions, CSRF,
failed logins, and where the station may listen.

- Users log in with name and password (``ui.users_file``, scrypt, ``pipeline/transport/users.py``)
  and get a signed session cookie. Tokens (``ui.tokens_file``) authenticate API clients with an
  ``Authorization: Bearer`` header. Both carry a role: ``viewer`` sees everything, ``operator``
  may also mark false alarms, label defects and undo overlay entries.
- Both files are read again when they change, so adding a user, demoting one or revoking a token
  counts from the next request without a restart.
- A form that changes something carries the session's CSRF token and must come from the
  station's own origin (Origin, else Referer): a page elsewhere cannot post through a logged-in
  operator's browser.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.errors import StripinspectError
from pipeline.process import RateLimitedLog
from pipeline.transport.users import (
    ROLES,
    CredentialsError,
    TokenRecord,
    UserRecord,
    find_token,
    load_tokens,
    load_users,
    verify_password,
)

log = logging.getLogger("stripinspect.ui")
SECRET_BYTES = 32


class UiStartError(StripinspectError):
    """The station cannot start (an address, a key, the users file); one line."""


@dataclass(frozen=True, kw_only=True)
class Identity:
    """Who makes a request: a user by session or a token's holder; ``role`` viewer or operator."""

    name: str
    role: str
    via: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.via not in ("session", "token"):
            raise ValueError(f"via must be session or token, got {self.via!r}")

    @property
    def operator(self) -> bool:
        return self.role == "operator"


# --- where to listen ---------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(*, host: str, tls_cert: Path | None, tls_key: Path | None, allow_insecure_bind: bool) -> bool:
    """Whether to serve HTTPS; UiStartError when the address may not be served as asked.
    Passwords and session cookies cross the network in clear over plain HTTP, so an address other
    than loopback needs TLS, or ``allow_insecure_bind`` for a closed cell network."""
    if (tls_cert is None) != (tls_key is None):
        raise UiStartError("ui.tls_cert and ui.tls_key go together: set both to serve HTTPS, or neither")
    tls = tls_cert is not None
    if not tls and not allow_insecure_bind and not is_loopback(host):
        raise UiStartError(
            f"ui.host {host!r} is not loopback: set ui.tls_cert and ui.tls_key (HTTPS), or "
            "ui.allow_insecure_bind: true on a closed network (passwords and cookies would cross it in clear)"
        )
    return tls


def session_secret(path: Path) -> str:
    """The key signing session cookies: made (random, mode 0600) at first start, then read. A key
    others can read would let them forge any session, so one that is not private is refused."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as err:
        raise UiStartError(f"ui.session_secret_file {path}: cannot create: {err.strerror or err}") from None
    else:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(SECRET_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        log.info("ui: new session key %s (logins from before are void)", path)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise UiStartError(f"ui.session_secret_file {path}: cannot read: {err}") from None
    if mode & 0o077:
        raise UiStartError(f"ui.session_secret_file {path} is readable by others (mode {mode:04o}): chmod 600 it")
    if len(text) < 2 * SECRET_BYTES:
        raise UiStartError(f"ui.session_secret_file {path}: key too short; delete the file to make a new one")
    return text


# --- CSRF ------------------------------------------------------------------------------------


def new_csrf() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: object, given: object) -> bool:
    """The form's token is the session's (compared in constant time)."""
    if not isinstance(expected, str) or not isinstance(given, str) or not expected:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def same_origin(*, origin: str | None, referer: str | None, scheme: str, host: str) -> bool:
    """The request comes from a page of this station: its Origin header, or without one its
    Referer, names ``scheme://host``. Neither: refused (browsers send Origin on every POST)."""
    own = f"{scheme}://{host}".lower()
    if origin is not None:
        return origin.lower() == own
    if referer:
        parts = urlsplit(referer)
        return f"{parts.scheme}://{parts.netloc}".lower() == own
    return False


# --- failed logins ---------------------------------------------------------------------------


class LoginLimiter:
    """At most ``max_failures`` failed logins per client in ``window_s``; then refused until the
    oldest failure leaves the window. Remembers at most ``max_clients`` clients (the least
    recent go), so a flood of addresses cannot fill the memory."""

    def __init__(
        self,
        *,
        max_failures: int = 5,
        window_s: float = 60.0,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_failures < 1 or not window_s > 0 or max_clients < 1:
            raise ValueError("max_failures >= 1, window_s > 0 and max_clients >= 1 are needed")
        self.max_failures, self.window_s, self.max_clients = max_failures, window_s, max_clients
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()
        self.refused_total = 0

    def retry_after(self, client: str) -> float:
        """0 when ``client`` may try now, else seconds until it may."""
        now = self._clock()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < self.window_s]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
            if len(recent) < self.max_failures:
                return 0.0
            self.refused_total += 1
            return max(0.0, recent[0] + self.window_s - now)

    def failed(self, client: str) -> None:
        now = self._clock()
        with self._lock:
            times = self._failures.pop(client, [])
            self._failures[client] = [*times, now][-self.max_failures :]
            while len(self._failures) > self.max_clients:
                del self._failures[next(iter(self._failures))]

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


# --- users and tokens ------------------------------------------------------------------------


class _Watched:
    """A file read again when its size or modification time changes; a damaged version is
    logged and the last good one kept (a half-edited file must not lock everyone out)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = Path(path), what
        self._sig: tuple[int, int] | None = None
        self._ratelog = RateLimitedLog(log, interval_s=60.0)

    def changed(self) -> bool:
        try:
            st = self.path.stat()
        except OSError as err:
            self._ratelog.error(self.what, "ui: %s %s unreadable, keeping the last read: %s", self.what, self.path, err)
            return False
        sig = (st.st_mtime_ns, st.st_size)
        if sig == self._sig:
            return False
        self._sig = sig
        return True

    def failed(self, err: Exception) -> None:
        self._sig = None  # try again at the next request
        self._ratelog.error(self.what, "ui: %s %s damaged, keeping the last good one: %s", self.what, self.path, err)


class Credentials:
    """The users file (required) and the tokens file (optional)."""

    def __init__(self, *, users_file: Path, tokens_file: Path | None) -> None:
        self._lock = threading.Lock()
        self._users_file = _Watched(users_file, "users file")
        self._tokens_file = None if tokens_file is None else _Watched(tokens_file, "tokens file")
        try:
            self._users_file.changed()
            self._users = load_users(users_file)
            self._tokens: list[TokenRecord] = []
            if self._tokens_file is not None:
                self._tokens_file.changed()
                self._tokens = load_tokens(self._tokens_file.path)
        except CredentialsError as err:
            raise UiStartError(str(err)) from None
        if not self._users:
            raise UiStartError(f"ui.users_file {users_file} has no users: add one with `stripinspect ui-user`")

    def users(self) -> dict[str, UserRecord]:
        with self._lock:
            if self._users_file.changed():
                try:
                    self._users = load_users(self._users_file.path)
                except CredentialsError as err:
                    self._users_file.failed(err)
            return self._users

    def tokens(self) -> list[TokenRecord]:
        with self._lock:
            if self._tokens_file is not None and self._tokens_file.changed():
                try:
                    self._tokens = load_tokens(self._tokens_file.path)
                except CredentialsError as err:
                    self._tokens_file.failed(err)
            return self._tokens

    def check_password(self, name: str, password: str) -> Identity | None:
        """The user when ``password`` is theirs. An unknown name costs one scrypt too, so the
        time taken does not tell which names exist."""
        rec = self.users().get(name)
        if not verify_password(rec, password):
            return None
        assert rec is not None
        return Identity(name=rec.name, role=rec.role, via="session")

    def session_user(self, name: str) -> Identity | None:
        """A logged-in user as the users file has them now (a removed user is logged out, a
        demoted one loses the actions at the next request)."""
        rec = self.users().get(name)
        return None if rec is None else Identity(name=rec.name, role=rec.role, via="session")

    def bearer(self, token: str) -> Identity | None:
        rec = find_token(self.tokens(), token)
        return None if rec is None else Identity(name=rec.name, role=rec.role, via="token")


class Revoked:
    """Sessions logged out before their cookie expires (the cookie itself cannot be taken back):
    their nonces until then. Kept in memory; a restart of the station forgets them, which is why
    ``session_max_age_s`` should stay a shift, not a month."""

    def __init__(self, *, clock: Callable[[], float] = time.time, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()
        self.max_entries = max_entries

    def revoke(self, nonce: str, *, until: float) -> None:
        now = self._clock()
        with self._lock:
            self._until = {n: t for n, t in self._until.items() if t > now}
            if len(self._until) >= self.max_entries:
                del self._until[next(iter(self._until))]
            self._until[nonce] = until

    def __contains__(self, nonce: object) -> bool:
        with self._lock:
            t = self._until.get(str(nonce))
        return t is not None and t > self._clock()
