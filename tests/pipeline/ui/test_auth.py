"""Access: where the station may listen, the session key, CSRF and origin, failed logins, users
and tokens read again when they change."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.transport.users import add_token, add_user
from pipeline.ui import auth


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_is_served_without_tls(host: str) -> None:
    assert auth.check_bind(host=host, tls_cert=None, tls_key=None, allow_insecure_bind=False) is False


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "station.plant.local"])
def test_any_other_address_needs_tls_or_an_explicit_yes(host: str, tmp_path: Path) -> None:
    with pytest.raises(auth.UiStartError, match=rf"ui.host '{host}' is not loopback: set ui.tls_cert"):
        auth.check_bind(host=host, tls_cert=None, tls_key=None, allow_insecure_bind=False)
    assert auth.check_bind(host=host, tls_cert=tmp_path / "c", tls_key=tmp_path / "k", allow_insecure_bind=False)
    assert not auth.check_bind(host=host, tls_cert=None, tls_key=None, allow_insecure_bind=True)


def test_a_certificate_needs_its_key() -> None:
    with pytest.raises(auth.UiStartError, match="go together"):
        auth.check_bind(host="127.0.0.1", tls_cert=Path("c.pem"), tls_key=None, allow_insecure_bind=False)


def test_the_session_key_is_made_private_once_and_then_kept(tmp_path: Path) -> None:
    path = tmp_path / "ui" / "session.key"
    first = auth.session_secret(path)
    assert len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert auth.session_secret(path) == first
    os.chmod(path, 0o644)
    with pytest.raises(auth.UiStartError, match=r"readable by others \(mode 0644\): chmod 600"):
        auth.session_secret(path)
    os.chmod(path, 0o600)
    path.write_text("short\n")
    with pytest.raises(auth.UiStartError, match="too short"):
        auth.session_secret(path)


def test_csrf_tokens_must_match_exactly() -> None:
    token = auth.new_csrf()
    assert auth.csrf_ok(token, token)
    assert token != auth.new_csrf()
    for expected, given in ((token, token[:-1]), (token, None), (None, token), ("", ""), (token, 5)):
        assert not auth.csrf_ok(expected, given)


def test_same_origin_by_origin_else_referer() -> None:
    own = {"scheme": "http", "host": "127.0.0.1:8080"}
    assert auth.same_origin(origin="http://127.0.0.1:8080", referer=None, **own)
    assert not auth.same_origin(origin="http://evil.example", referer="http://127.0.0.1:8080/x", **own)
    assert not auth.same_origin(origin="https://127.0.0.1:8080", referer=None, **own)  # another scheme
    assert not auth.same_origin(origin="null", referer=None, **own)  # a sandboxed or file page
    assert auth.same_origin(origin=None, referer="http://127.0.0.1:8080/defect/x", **own)
    assert not auth.same_origin(origin=None, referer="http://127.0.0.1:8081/", **own)
    assert not auth.same_origin(origin=None, referer=None, **own)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_failed_logins_are_limited_per_client_within_a_window() -> None:
    clock = Clock()
    lim = auth.LoginLimiter(max_failures=3, window_s=60.0, clock=clock)
    for _ in range(3):
        assert lim.retry_after("a") == 0
        lim.failed("a")
        clock.t += 1
    assert lim.retry_after("a") == pytest.approx(57.0)
    assert lim.retry_after("b") == 0  # another client is not held up
    clock.t = 60.5  # the first failure left the window
    assert lim.retry_after("a") == 0
    lim.succeeded("a")
    lim.failed("a")
    assert lim.retry_after("a") == 0 and lim.refused_total == 1


def test_the_limiter_remembers_a_bounded_number_of_clients() -> None:
    lim = auth.LoginLimiter(max_failures=1, window_s=60.0, max_clients=3, clock=Clock())
    for i in range(10):
        lim.failed(f"10.0.0.{i}")
    assert lim.retry_after("10.0.0.9") > 0 and lim.retry_after("10.0.0.0") == 0


def test_credentials_follow_their_files(tmp_path: Path) -> None:
    users, tokens = tmp_path / "users", tmp_path / "tokens"
    add_user(users, "op", "long enough pw", role="operator")
    t = add_token(tokens, "mes", role="viewer")
    creds = auth.Credentials(users_file=users, tokens_file=tokens)
    ident = creds.check_password("op", "long enough pw")
    assert ident == auth.Identity(name="op", role="operator", via="session")
    assert creds.check_password("op", "wrong") is None and creds.check_password("x", "long enough pw") is None
    assert creds.bearer(t) == auth.Identity(name="mes", role="viewer", via="token")
    # Demoted, added, revoked: from the next request.
    add_user(users, "op", "long enough pw", role="viewer")
    add_user(users, "new", "another password")
    assert creds.session_user("op") == auth.Identity(name="op", role="viewer", via="session")
    assert creds.session_user("new") is not None
    add_token(tokens, "mes", role="viewer")  # a new token for mes: the old one is gone
    assert creds.bearer(t) is None
    # A damaged file keeps the last good one (logged) rather than locking everyone out.
    users.write_text(users.read_text() + "garbage line\n")
    assert creds.session_user("op") is not None


def test_credentials_need_users(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("# nobody yet\n")
    with pytest.raises(auth.UiStartError, match="has no users: add one with `stripinspect ui-user`"):
        auth.Credentials(users_file=tmp_path / "users", tokens_file=None)
    with pytest.raises(auth.UiStartError, match="cannot read users file"):
        auth.Credentials(users_file=tmp_path / "missing", tokens_file=None)


def test_revoked_sessions_stay_revoked_until_their_cookie_expires() -> None:
    clock = Clock()
    rev = auth.Revoked(clock=clock)
    rev.revoke("n1", until=100.0)
    assert "n1" in rev and "n2" not in rev
    clock.t = 100.5
    assert "n1" not in rev


def test_identity_checks_its_fields() -> None:
    with pytest.raises(ValueError, match="role"):
        auth.Identity(name="x", role="admin", via="session")
    with pytest.raises(ValueError, match="via"):
        auth.Identity(name="x", role="viewer", via="cookie")
    assert auth.Identity(name="x", role="operator", via="token").operator
