"""The station's web app over real HTTP (uvicorn on 127.0.0.1) following real ZeroMQ publishers:
login, roles, tokens, CSRF and origin checks, pages, images, the event stream, the actions
reaching the daemon's control socket."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from pipeline.coil.model import Grading, PeriodicFamily, RuleOutcome
from pipeline.ui.app import CSP, SESSION_COOKIE
from tests.pipeline.ui.fakeline import FakeCoilService, FakeDaemon, wait_for
from tests.pipeline.ui.harness import Client, Running, running_station

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


@pytest.fixture
def line(context: zmq.Context, tmp_path: Path) -> Iterator[Running]:
    d = FakeDaemon(context=context)
    coil = FakeCoilService(context=context)
    try:
        with running_station(tmp_path, context=context, daemons=[d], coil_pub=coil.pub.endpoint) as r:
            r.until_following()
            r.coil_service = coil  # type: ignore[attr-defined]
            yield r
    finally:
        coil.close()
        d.close()


def _alert(r: Running, **over: Any) -> dict[str, Any]:
    h = r.daemons["cam0"].alert(**over)
    wait_for(lambda: r.station.state.alert("cam0", h["journal"], h["seq"]), what="the alert at the station")
    return h


def test_pages_need_a_login_and_remember_where_to_return(line: Running) -> None:
    c = Client(line.url)
    r = c.get("/coil?x=1")
    assert r.status == 303 and r.headers["location"] == "/login?next=/coil%3Fx%3D1"
    assert c.get("/api/state").status == 401
    assert c.get("/events").status == 401
    assert c.get("/camera/cam0/preview.jpg").status == 401
    assert c.get("/healthz").status == 200
    token = c.csrf("/login")
    r = c.post("/login", {"user": "vi", "password": "correct horse battery", "csrf": token, "next": "/coil?x=1"})
    assert r.status == 303 and r.headers["location"] == "/coil?x=1"
    assert c.get("/coil").status == 200


def test_journal_ids_with_slashes_and_spaces_reach_their_pages(line: Running) -> None:
    h = _alert(line, journal="j/2 x")
    c = Client(line.url)
    c.login("vi")
    assert f'href="/defect/cam0/j%2F2%20x/{h["seq"]}"' in c.get("/").text
    assert c.get(f"/defect/cam0/j%2F2%20x/{h['seq']}").status == 200
    assert c.get(f"/defect/cam0/j%2F2%20y/{h['seq']}").status == 404


def test_the_session_cookie_is_httponly_strict_and_signed(line: Running) -> None:
    c = Client(line.url)
    c.login("op")
    cookie = next(v for v in c.set_cookie_headers[::-1] if v.startswith(SESSION_COOKIE))
    flags = cookie.lower()
    assert "httponly" in flags and "samesite=strict" in flags and "max-age=3600" in flags
    assert "secure" not in flags  # plain HTTP on loopback; the TLS test checks Secure
    # A cookie altered by one character is no login.
    value = c.cookies[SESSION_COOKIE]
    c.cookies[SESSION_COOKIE] = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    assert c.get("/").status == 303


def test_a_wrong_password_or_user_is_refused_after_a_delay(line: Running) -> None:
    c = Client(line.url)
    for user, password in (("op", "wrong password"), ("nobody", "correct horse battery")):
        t0 = time.monotonic()
        r = c.login(user, password)
        assert r.status == 401 and "Wrong user name or password" in r.text
        assert time.monotonic() - t0 >= line.station.settings.login_delay_s
    assert c.get("/").status == 303


def test_large_bodies_are_refused_before_anyone_reads_them(line: Running) -> None:
    c = Client(line.url)
    token = c.csrf("/login")
    r = c.post("/login", {"user": "op", "password": "x" * 70_000, "csrf": token})
    assert r.status == 413
    assert line.station.limiter.retry_after("127.0.0.1") == 0  # not even counted as a login


def test_failed_logins_are_limited_per_client(line: Running) -> None:
    c = Client(line.url)
    for _ in range(line.station.limiter.max_failures):
        assert c.login("op", "wrong password").status == 401
    r = c.login("op", "correct horse battery")  # even the right password, while refused
    assert r.status == 429 and "Too many failed logins" in r.text
    assert c.get("/").status == 303


def test_login_and_logout_need_the_form_token_and_our_origin(line: Running) -> None:
    c = Client(line.url)
    token = c.csrf("/login")
    good = {"user": "op", "password": "correct horse battery", "csrf": token, "next": "/"}
    assert c.post("/login", {**good, "csrf": "forged"}).status == 403
    assert c.post("/login", good, origin="http://evil.example").status == 403
    assert c.post("/login", good, origin=None).status == 403  # neither Origin nor Referer
    r = c.post("/login", good, origin=None, headers={"Referer": line.url + "/login"})
    assert r.status == 303
    # A new CSRF token at login: the one from before the login is worth nothing after it.
    assert c.csrf("/") != token
    stolen = dict(c.cookies)
    logout_token = c.csrf("/")
    assert c.post("/logout", {"csrf": "forged"}).status == 403
    assert c.post("/logout", {"csrf": logout_token}).status == 303
    assert c.get("/").status == 303
    # The signed cookie from before the logout is refused too (its nonce is revoked).
    thief = Client(line.url)
    thief.cookies = stolen
    assert thief.get("/").status == 303


def test_live_page_lists_alerts_with_thumbnails_and_frames(line: Running) -> None:
    d = line.daemons["cam0"]
    c = Client(line.url)
    c.login("vi")
    import base64

    import cv2

    ok, png = cv2.imencode(".png", np.full((64, 64), 120, np.uint8))
    assert ok
    h = _alert(line, thumbnail_png=base64.b64encode(png.tobytes()).decode(), **{"class": "scratch"})
    image = np.full((256, 512), 128, np.uint8)
    score = np.zeros((256, 512), np.float32)
    score[200:215, 100:130] = 5.0
    fid = d.frame(image=image, score_map=score, threshold=2.0, frame_id=int(h["frame_id"]))
    wait_for(lambda: (f := line.station.state.frame("cam0")) is not None and f.frame_id == fid, what="the frame")
    page = c.get("/")
    assert page.status == 200
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["cache-control"] == "no-store" and page.headers["x-frame-options"] == "DENY"
    assert 'href="/defect/cam0/j-test/1"' in page.text and "scratch" in page.text
    thumb = c.get("/alert/cam0/j-test/1/thumb.png")
    assert thumb.status == 200 and thumb.body == png.tobytes()
    jpg = c.get("/camera/cam0/preview.jpg")
    assert jpg.status == 200 and jpg.body.startswith(b"\xff\xd8")
    overlay = c.get("/camera/cam0/overlay.png")
    assert overlay.status == 200 and overlay.body.startswith(PNG)
    heat = c.get("/alert/cam0/j-test/1/heat.png")
    assert heat.status == 200 and heat.body.startswith(PNG)
    frag = c.get("/fragments/cameras")
    assert frag.status == 200 and "running" in frag.text


def test_the_event_stream_delivers_alerts_frames_and_heartbeats(line: Running) -> None:
    c = Client(line.url)
    c.login("vi")
    conn = http.client.HTTPConnection("127.0.0.1", int(line.url.rsplit(":", 1)[1]), timeout=10)
    conn.request("GET", "/events", headers={"Cookie": f"{SESSION_COOKIE}={c.cookies[SESSION_COOKIE]}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type", "").startswith("text/event-stream")
    wait_for(lambda: line.station.hub.clients == 1, what="the stream's subscription")
    d = line.daemons["cam0"]
    d.alert(md_m=33.5)
    d.heartbeat()
    events: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 10
    kind = None
    while time.monotonic() < deadline and not {"alert", "camera"} <= set(events):
        raw = resp.fp.readline().decode().strip()
        if raw.startswith("event: "):
            kind = raw[7:]
        elif raw.startswith("data: ") and kind:
            events[kind] = json.loads(raw[6:])
    assert events["alert"]["md_m"] == 33.5 and events["alert"]["path"] == "cam0/j-test/1"
    assert events["camera"]["state"] == "running"
    # Logged out elsewhere (another tab): the open stream ends with the next update.
    c.post("/logout", {"csrf": c.csrf("/")})
    d.heartbeat()
    # The raw chunked stream, line by line, to its last chunk (size 0); the socket timeout guards it.
    rest = []
    while (raw_line := resp.fp.readline()) not in (b"0\r\n", b""):
        rest.append(raw_line)
    conn.close()
    assert raw_line == b"0\r\n" and b"event: camera\n" not in rest
    wait_for(lambda: line.station.hub.clients == 0, what="the stream's subscription to end")


def test_a_viewer_gets_no_action_buttons_and_403_on_the_actions(line: Running) -> None:
    h = _alert(line)
    c = Client(line.url)
    c.login("vi")
    page = c.get("/defect/cam0/j-test/1")
    assert page.status == 200
    assert "false-alarm-form" not in page.text and "label-form" not in page.text
    assert "only operators" in page.text
    token = c.csrf("/")
    form = {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"], "next": "/"}
    assert c.post("/action/false_alarm", form).status == 403
    assert c.post("/action/label", {**form, "class": "scratch"}).status == 403
    assert c.post("/action/undo", {**form, "id": 1}).status == 403
    assert line.daemons["cam0"].calls_of("false_alarm") == []
    assert line.daemons["cam0"].calls_of("label") == []


def test_an_operators_false_alarm_reaches_the_daemon_and_the_reply_is_shown(line: Running) -> None:
    h = _alert(line, max_score=3.0, threshold=2.0)
    c = Client(line.url)
    c.login("op")
    token = c.csrf("/defect/cam0/j-test/1")
    form = {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"], "next": "/defect/cam0/j-test/1"}
    # Without the token, or from elsewhere: refused before the daemon hears of it.
    assert c.post("/action/false_alarm", {**form, "csrf": "x"}).status == 403
    assert c.post("/action/false_alarm", form, origin="http://evil.example").status == 403
    assert line.daemons["cam0"].calls_of("false_alarm") == []
    r = c.post("/action/false_alarm", form)
    assert r.status == 303 and r.headers["location"] == "/defect/cam0/j-test/1"
    calls = line.daemons["cam0"].calls_of("false_alarm")
    assert calls == [{"cmd": "false_alarm", "journal": "j-test", "seq": h["seq"], "user": "op"}]
    page = c.get("/defect/cam0/j-test/1").text
    assert "marked a false alarm" in page and "overlay entry 1 (normal, 24 rows)" in page
    # The message is shown once.
    assert "marked a false alarm" not in c.get("/defect/cam0/j-test/1").text


def test_a_refusal_of_the_daemon_is_shown_as_such(line: Running) -> None:
    h = _alert(line, max_score=9.0, threshold=2.0)
    c = Client(line.url)
    c.login("op")
    token = c.csrf("/")
    c.post("/action/false_alarm", {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"], "next": "/"})
    page = c.get("/").text
    assert 'class="flash refused"' in page and "cam0 refused false alarm #1" in page
    assert "feedback.max_score_ratio" in page


def test_label_reaches_the_daemon_and_bad_classes_are_refused(line: Running) -> None:
    h = _alert(line)
    c = Client(line.url)
    c.login("op")
    token = c.csrf("/")
    form = {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"], "next": "/"}
    assert c.post("/action/label", {**form, "class": ""}).status == 400
    assert c.post("/action/label", {**form, "class": "x" * 65}).status == 400
    assert c.post("/action/label", {**form, "class": "unknowncamera", "camera": "cam9"}).status == 400
    assert c.post("/action/label", {**form, "class": " roll mark "}).status == 303
    calls = line.daemons["cam0"].calls_of("label")
    assert calls == [{"cmd": "label", "journal": "j-test", "seq": h["seq"], "class": "roll mark", "user": "op"}]
    # The new class is offered for the next label (the daemon's overlay lists it).
    line.station.classes_cache.clear()
    assert '<option value="roll mark">' in c.get("/defect/cam0/j-test/1").text


def test_the_overlay_page_lists_entries_and_undo_removes_one(line: Running) -> None:
    h = _alert(line)
    c = Client(line.url)
    c.login("op")
    token = c.csrf("/")
    c.post("/action/false_alarm", {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"]})
    c.post("/action/label", {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"], "class": "pit"})
    page = c.get("/overlay").text
    assert 'data-entry="1"' in page and 'data-entry="2"' in page
    assert "false alarm (normal)" in page and "label: pit" in page and "pit (1)" in page
    r = c.post("/action/undo", {"csrf": token, "camera": "cam0", "id": 1, "next": "/overlay"})
    assert r.status == 303
    assert line.daemons["cam0"].calls_of("overlay_undo") == [{"cmd": "overlay_undo", "id": 1, "user": "op"}]
    page = c.get("/overlay").text
    assert 'data-entry="1" class="removed"' in page and "removed by op" in page and 'data-entry="2">' in page
    assert "overlay entry 1 removed" in page


def test_a_daemon_that_does_not_answer_is_reported_not_hung(context: zmq.Context, tmp_path: Path) -> None:
    d = FakeDaemon(context=context)
    try:
        # Nothing listens on the control endpoint: requests time out (2 s in the harness).
        with running_station(tmp_path, context=context, daemons=[d], controls={"cam0": "tcp://127.0.0.1:9"}) as r:
            r.until_following()
            h = _alert(r)
            c = Client(r.url)
            assert c.get("/overlay").status == 303
            c.login("op")
            page = c.get("/overlay").text
            assert "cam0 did not give its overlay" in page and "no reply" in page
            token = c.csrf("/")
            c.post("/action/false_alarm", {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"]})
            assert "no reply to &#39;false_alarm&#39;" in c.get("/").text
    finally:
        d.close()


def test_tokens_authenticate_api_clients_with_their_role(line: Running) -> None:
    h = _alert(line)
    c = Client(line.url)
    viewer = {"Authorization": f"Bearer {line.tokens['api-vi']}"}
    operator = {"Authorization": f"Bearer {line.tokens['api-op']}"}
    state = c.get("/api/state", headers=viewer)
    assert state.status == 200
    body = state.json()
    assert body["user"] == {"name": "api-vi", "role": "viewer"}
    assert body["alerts"][0]["page"] == "/defect/cam0/j-test/1"
    assert c.get("/api/state", headers={"Authorization": "Bearer nope"}).status == 401
    assert c.get("/api/state", headers={"Authorization": "Basic b3A6eA=="}).status == 401
    action = json.dumps({"camera": "cam0", "journal": "j-test", "seq": h["seq"]}).encode()
    json_headers = {"Content-Type": "application/json"}
    r = c.request("POST", "/action/false_alarm", body=action, headers={**viewer, **json_headers})
    assert r.status == 403
    # No cookie, so no CSRF token and no Origin needed: the token is the credential.
    r = c.request("POST", "/action/false_alarm", body=action, headers={**operator, **json_headers})
    assert r.status == 200 and r.json()["entry"]["user"] == "api-op"
    refused = json.dumps({"camera": "cam0", "journal": "j-test", "seq": 99}).encode()
    r = c.request("POST", "/action/false_alarm", body=refused, headers={**operator, **json_headers})
    assert r.status == 409 and "no longer kept" in r.json()["error"]


def test_a_user_removed_or_demoted_loses_access_at_the_next_request(line: Running, tmp_path: Path) -> None:
    from pipeline.transport.users import add_user

    h = _alert(line)
    c = Client(line.url)
    c.login("op")
    assert c.get("/").status == 200
    add_user(tmp_path / "users", "op", "correct horse battery", role="viewer")
    page = c.get("/defect/cam0/j-test/1").text
    assert "false-alarm-form" not in page
    token = c.csrf("/")
    form = {"csrf": token, "camera": "cam0", "journal": "j-test", "seq": h["seq"]}
    assert c.post("/action/false_alarm", form).status == 403
    (tmp_path / "users").write_text(
        "\n".join(ln for ln in (tmp_path / "users").read_text().splitlines() if not ln.startswith("op:"))
    )
    assert c.get("/").status == 303


def test_coil_page_draws_the_live_coil_and_the_coil_service_results(line: Running) -> None:
    d = line.daemons["cam0"]
    coil_service = line.coil_service  # type: ignore[attr-defined]
    d.coil("start", "C1")
    for i in range(3):
        _alert(line, md_m=10.0 + 20 * i, cd_mm=200.0 + 300 * i, **{"class": "scratch" if i else "unknown"})
    family = PeriodicFamily(
        side="top",
        cd_mm=500.0,
        period_m=1.759,
        phase_m=3.2,
        count=4,
        confidence=1.0,
        md_m=(3.2, 4.96, 6.72, 8.48),
        confirmed=True,
        roll="work roll top",
    )
    grading = Grading(
        grade="DC04", disposition="hold", outcomes=(RuleOutcome("periodic", 1.0, 0.0, True, "hold"),), final=False
    )
    coil_service.periodic("C1", family)
    coil_service.grading("C1", grading)
    wait_for(
        lambda: (v := line.station.state.coil("C1")) is not None and v.grading is not None and v.families,
        what="grading",
    )
    c = Client(line.url)
    c.login("vi")
    page = c.get("/coil").text
    assert "Coil C1" in page and "HOLD" in page and "work roll top" in page
    assert page.count('class="defect"') == 3
    assert page.count('class="family"') >= 4
    assert 'href="/defect/cam0/j-test/3"' in page
    frag = c.get("/fragments/coil")
    assert frag.status == 200 and frag.text.count('class="defect"') == 3


def test_past_coils_their_map_thumbnails_and_report_files(context: zmq.Context, tmp_path: Path) -> None:
    import cv2

    from pipeline.coil.model import CoilDefect, CoilInfo
    from pipeline.coil.records import CoilRecords
    from pipeline.coil.service import safe_name

    db, reports = tmp_path / "coils" / "coils.sqlite", tmp_path / "reports"
    ok, png = cv2.imencode(".png", np.full((16, 16), 90, np.uint8))
    assert ok
    with CoilRecords(path=db, synchronous="NORMAL") as records:
        now = time.time()  # records older than coil.db.max_age_days are pruned at close
        records.open_coil(CoilInfo(coil_id="24/A 1", grade="DC04", head_line=0, width_mm=1250.0), started_utc=now)
        d = CoilDefect("24/A 1", "top", 12.0, 300.0, 10.0, 4.0, 30.0, 3.0, ("cam0",), ())
        stored = records.add_defect(d, camera="cam0", seq=1, merge_mm=10.0, thumbnail_png=png.tobytes())
        assert stored is not None
        g = Grading("DC04", "scrap", (RuleOutcome("size", 900.0, 500.0, True, "scrap"),), True)
        records.set_results("24/A 1", families=(), grading=g)
        records.close_coil("24/A 1", tail_line=100_000, length_m=50.0, ended_utc=now + 60)
    folder = reports / safe_name("24/A 1")
    folder.mkdir(parents=True)
    (folder / "report.pdf").write_bytes(b"%PDF-1.4 fake")
    (tmp_path / "secret.txt").write_text("not for the station")
    d0 = FakeDaemon(context=context)
    try:
        with running_station(tmp_path, context=context, daemons=[d0], coil_db=db, reports_dir=reports) as r:
            c = Client(r.url)
            c.login("vi")
            listing = c.get("/coil").text
            assert 'href="/coils/24%2FA%201"' in listing and "scrap" in listing
            assert 'href="/coils/24%2FA%201/file/report.pdf"' in listing and "map.png" not in listing
            page = c.get("/coils/24%2FA%201")
            assert page.status == 200 and "SCRAP" in page.text and page.text.count('class="defect"') == 1
            href = f"/coils/24%2FA%201/thumb/{stored.defect_id}"
            assert f'href="{href}"' in page.text
            thumb = c.get(href)
            assert thumb.status == 200 and thumb.body == png.tobytes()
            pdf = c.get("/coils/24%2FA%201/file/report.pdf")
            assert pdf.status == 200 and pdf.body == b"%PDF-1.4 fake"
            assert "attachment" in pdf.headers["content-disposition"]
            assert c.get("/coils/24%2FA%201/file/map.png").status == 404  # not written
            assert c.get("/coils/24%2FA%201/file/..%2F..%2Fsecret.txt").status == 404
            assert c.get("/coils/..%2Fsecret.txt/file/report.pdf").status == 404
            assert c.get("/coils/nope").status == 404
    finally:
        d0.close()


def test_without_coil_records_the_coil_page_says_so(line: Running) -> None:
    c = Client(line.url)
    c.login("vi")
    page = c.get("/coil").text
    assert "ui.coil_db is not set" in page
