"""``stripinspect ui``, ``ui-user`` and ``ui-token``: files written, start-up errors in one line."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.transport.users import find_token, load_tokens, load_users, verify_password
from stripinspect.cli import main


def test_ui_user_reads_the_password_from_stdin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "etc" / "users"
    monkeypatch.setattr("sys.stdin", io.StringIO("shift leader pw\n"))
    assert main(["ui-user", "anna", "--role", "operator", "--users-file", str(users)]) == 0
    assert "user anna set (operator" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("quality pw 123\n"))
    assert main(["ui-user", "ben", "--role", "viewer", "--users-file", str(users)]) == 0
    loaded = load_users(users)
    assert (loaded["anna"].role, loaded["ben"].role) == ("operator", "viewer")
    assert verify_password(loaded["anna"], "shift leader pw") and verify_password(loaded["ben"], "quality pw 123")
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["ui-user", "carl", "--role", "viewer", "--users-file", str(users)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: password of 'carl'") and len(err.splitlines()) == 1


def test_ui_token_prints_the_token_once_and_stores_its_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens"
    assert main(["ui-token", "mes", "--role", "viewer", "--tokens-file", str(tokens)]) == 0
    out = capsys.readouterr()
    token = out.out.strip()
    assert len(token) >= 40 and token not in tokens.read_text() and "only its SHA-256" in out.err
    rec = find_token(load_tokens(tokens), token)
    assert rec is not None and (rec.name, rec.role) == ("mes", "viewer")


def test_ui_start_up_problems_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("ui:\n  host: 0.0.0.0\n  users_file: users\n")
    assert main(["ui", "--config", str(cfg), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ui.host '0.0.0.0' is not loopback") and len(err.splitlines()) == 1
    cfg.write_text("ui:\n  port: 0\n")
    assert main(["ui", "--config", str(cfg)]) == 2
    assert "ui.port = 0" in capsys.readouterr().err
    cfg.write_text("ui:\n  users_file: null\n")
    assert main(["ui", "--config", str(cfg), "--quiet"]) == 2
    assert "ui.users_file is not set" in capsys.readouterr().err


def test_config_yaml_states_the_ui_defaults() -> None:
    from pipeline.config import Config, load_config
    from tests.conftest import REPO

    assert load_config(REPO / "config.yaml").ui == Config().ui
