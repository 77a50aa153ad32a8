"""Users (scrypt hashes with a role) and API tokens (SHA-256): real files in tmp_path."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.transport import users as u


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_roles_are_stored_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "users"
    u.add_user(path, "anna", "correct horse", role="viewer")
    u.add_user(path, "ben", "battery staple", role="operator")
    loaded = u.load_users(path)
    assert {n: r.role for n, r in loaded.items()} == {"anna": "viewer", "ben": "operator"}
    assert _mode(path) == 0o600
    assert u.verify_password(loaded["anna"], "correct horse")
    assert not u.verify_password(loaded["anna"], "battery staple")
    # Changing a role keeps one line per user.
    u.add_user(path, "anna", "correct horse", role="operator")
    assert [r.role for r in u.load_users(path).values()] == ["operator", "operator"]


def test_a_line_without_a_role_is_an_operator(tmp_path: Path) -> None:
    # The OPC UA users files written before roles existed: seven fields.
    rec = u.hash_password("plc", "long enough")
    old = ":".join(rec.line().split(":")[:7])
    path = tmp_path / "users"
    path.write_text(old + "\n")
    loaded = u.load_users(path)
    assert loaded["plc"].role == "operator"
    assert u.verify_user(path, "plc", "long enough")


def test_an_unknown_role_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_text("# users\n" + u.hash_password("x1", "long enough").line().rsplit(":", 1)[0] + ":admin\n")
    with pytest.raises(u.CredentialsError, match=r"users:2: role 'admin'"):
        u.load_users(path)
    with pytest.raises(u.CredentialsError, match="role 'root'"):
        u.add_user(path, "x2", "long enough", role="root")


def test_tokens_are_stored_as_hashes_with_their_role(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    t1 = u.add_token(path, "mes", role="viewer")
    t2 = u.add_token(path, "qa-bot", role="operator")
    text = path.read_text()
    assert t1 not in text and t2 not in text
    assert _mode(path) == 0o600
    tokens = u.load_tokens(path)
    found = u.find_token(tokens, t1)
    assert found is not None and (found.name, found.role) == ("mes", "viewer")
    found = u.find_token(tokens, t2)
    assert found is not None and (found.name, found.role) == ("qa-bot", "operator")
    assert u.find_token(tokens, t1 + "x") is None
    assert u.find_token(tokens, "") is None


def test_a_new_token_of_a_name_replaces_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    old = u.add_token(path, "mes", role="viewer")
    new = u.add_token(path, "mes", role="operator")
    tokens = u.load_tokens(path)
    assert len(tokens) == 1
    assert u.find_token(tokens, old) is None
    rec = u.find_token(tokens, new)
    assert rec is not None and rec.role == "operator"


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("mes:viewer", "expected name:role:sha256hex"),
        ("mes:admin:" + "0" * 64, "role 'admin'"),
        ("mes:viewer:" + "0" * 63, "64 lowercase hex"),
        ("../x:viewer:" + "0" * 64, "token '../x'"),
    ],
)
def test_damaged_token_lines_are_refused_with_their_line(tmp_path: Path, line: str, why: str) -> None:
    path = tmp_path / "tokens"
    path.write_text("# tokens\n\n" + line + "\n")
    with pytest.raises(u.CredentialsError, match=rf"tokens:3: .*{why}"):
        u.load_tokens(path)
