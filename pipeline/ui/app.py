"""The station's web app (Starlette): pages rendered on the server, a live event stream, the
operators' actions, images, downloads.

Every page and asset comes from this package (templates/, static/): no CDN, nothing fetched
elsewhere, and a Content-Security-Policy that allows only this origin. Actions go to the daemons
through ``pipeline.transport.feedback``, the one client of those commands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jinja2
import zmq
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.coil.model import CoilDefect, CoilInfo
from pipeline.coil.records import RecordsError
from pipeline.coil.report_data import CoilSummary, map_length_m, strip_span_mm
from pipeline.coil.service import coil_summary
from pipeline.config import CoilConfig
from pipeline.transport.feedback import label_defect, list_overlay, mark_false_alarm, undo_overlay
from pipeline.ui.auth import Credentials, Identity, LoginLimiter, Revoked, csrf_ok, new_csrf, same_origin
from pipeline.ui.coilmap import MapDrawing, draw_coil_map, grown_length_m
from pipeline.ui.hub import Hub
from pipeline.ui.past import PastCoils
from pipeline.ui.state import AlertView, CoilView, LineState

log = logging.getLogger("stripinspect.ui")
HERE = Path(__file__).parent
KEEPALIVE_S = 15.0
CLASSES_TTL_S = 10.0
MAX_CLASS_LEN = 64
SESSION_COOKIE = "stripinspect_session"
MAX_BODY = 64 * 1024  # the largest form or JSON body a request may carry
# Only this origin: scripts, styles, images (thumbnails come as PNG from here), the event stream.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the app needs of the config: each camera's control endpoint, the coil service's
    camera spans (for the map's CD extent), session and action settings."""

    controls: dict[str, str]
    coil: CoilConfig
    session_max_age_s: int
    tls: bool
    feedback_timeout_s: float = 10.0
    overlay_timeout_s: float = 5.0
    login_delay_s: float = 0.5
    past_coils: int = 50


@dataclass(kw_only=True)
class Station:
    """The app's parts (``request.app.state.station``)."""

    settings: Settings
    state: LineState
    hub: Hub
    credentials: Credentials
    past: PastCoils
    context: zmq.Context
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    revoked: Revoked = field(default_factory=Revoked)
    tick: float = field(default_factory=time.monotonic)
    classes_cache: dict[str, tuple[float, list[str]]] = field(default_factory=dict)


class LoginRequiredError(Exception):
    """A page asked for without a login: the login page, then back."""


def station_of(request: Request) -> Station:
    st: Station = request.app.state.station
    return st


# --- who asks ----------------------------------------------------------------------------------


def identify(request: Request) -> Identity | None:
    """The bearer of a valid token, else the user of a valid session; None otherwise. A request
    with an Authorization header is judged by it alone."""
    st = station_of(request)
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        return st.credentials.bearer(token.strip())
    s = request.session
    name, started, nonce = s.get("u"), s.get("t"), s.get("n")
    if not isinstance(name, str) or not isinstance(started, int | float) or not isinstance(nonce, str):
        return None
    # The cookie is signed with a timestamp that moves whenever the session changes; the login
    # lifetime counts from the login itself.
    if time.time() - started > st.settings.session_max_age_s or nonce in st.revoked:
        return None
    return st.credentials.session_user(name)


def page_user(request: Request) -> Identity:
    ident = identify(request)
    if ident is None:
        raise LoginRequiredError
    return ident


def api_user(request: Request) -> Identity:
    ident = identify(request)
    if ident is None:
        raise HTTPException(401, "log in, or send Authorization: Bearer <token>")
    return ident


def csrf_token(request: Request) -> str:
    token = request.session.get("c")
    if not isinstance(token, str):
        token = request.session["c"] = new_csrf()
    return token


def check_origin(request: Request) -> None:
    if not same_origin(
        origin=request.headers.get("origin"),
        referer=request.headers.get("referer"),
        scheme=request.url.scheme,
        host=request.headers.get("host", ""),
    ):
        raise HTTPException(403, "refused: the form did not come from this station's pages")


async def read_form(request: Request) -> dict[str, str]:
    """A form (or, for token clients, a JSON object) as strings; small, no files."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise HTTPException(400, "body is not JSON") from None
        if not isinstance(body, dict):
            raise HTTPException(400, "body must be a JSON object")
        return {str(k): str(v) for k, v in body.items() if v is not None}
    form: FormData = await request.form(max_files=0, max_fields=20, max_part_size=4096)
    return {k: v for k, v in form.items() if isinstance(v, str)}


async def operator_post(request: Request) -> tuple[Identity, dict[str, str]]:
    """An action's caller and form: a token's bearer as is; a session user when the form comes
    from our origin with the session's CSRF token. Only operators act."""
    ident = identify(request)
    if ident is None:
        raise HTTPException(401, "log in, or send Authorization: Bearer <token>")
    if ident.via == "session":
        check_origin(request)
    form = await read_form(request)
    if ident.via == "session" and not csrf_ok(request.session.get("c"), form.get("csrf")):
        raise HTTPException(403, "refused: the form's CSRF token is missing or stale (reload the page)")
    if not ident.operator:
        raise HTTPException(403, f"{ident.name} is a viewer: only operators change the model")
    return ident, form


def safe_next(value: object) -> str:
    """A path on this site to return to; anything else (another site, a scheme) goes home."""
    if not isinstance(value, str) or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


# --- templates -----------------------------------------------------------------------------------


def _clock(t: float | None) -> str:
    return "-" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def make_templates() -> Jinja2Templates:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(clock=_clock, when=_when, num=_num, q=lambda s: quote(str(s), safe=""))
    return Jinja2Templates(env=env)


TEMPLATES = make_templates()


def render(request: Request, name: str, ident: Identity | None, status: int = 200, **context: Any) -> HTMLResponse:
    flash = request.session.pop("flash", None) if ident is not None and ident.via == "session" else None
    base = {
        "user": ident,
        "csrf": csrf_token(request) if ident is None or ident.via == "session" else "",
        "flash": flash,
        "page": name.removesuffix(".html"),
        "cameras": list(station_of(request).settings.controls),
    }
    # Pages show one user's view of the line: not kept by the browser (a shared station PC, Back
    # after Log out) nor by anything between.
    response: HTMLResponse = TEMPLATES.TemplateResponse(
        request, name, {**base, **context}, status_code=status, headers={"Cache-Control": "no-store"}
    )
    return response


def fragment(request: Request, name: str, **context: Any) -> HTMLResponse:
    response: HTMLResponse = TEMPLATES.TemplateResponse(request, name, context, headers={"Cache-Control": "no-store"})
    return response


# --- login ---------------------------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    if identify(request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    return render(request, "login.html", None, next=safe_next(request.query_params.get("next")), error=None)


async def login(request: Request) -> Response:
    st = station_of(request)
    check_origin(request)
    form = await read_form(request)
    if not csrf_ok(request.session.get("c"), form.get("csrf")):
        raise HTTPException(403, "refused: the login form is stale (reload the page)")
    client = request.client.host if request.client else "unknown"
    nxt = safe_next(form.get("next"))
    wait = st.limiter.retry_after(client)
    if wait > 0:
        log.warning("ui: login refused for %s: too many failures", client)
        msg = f"Too many failed logins from this address: try again in {math.ceil(wait)} s."
        return render(request, "login.html", None, status=429, next=nxt, error=msg)
    name, password = form.get("user", ""), form.get("password", "")
    ident = await run_in_threadpool(st.credentials.check_password, name, password)
    if ident is None:
        st.limiter.failed(client)
        log.warning("ui: failed login as %r from %s", name[:64], client)
        # Slows guessing beyond scrypt's own cost, without holding a thread (an await, not a sleep).
        await asyncio.sleep(st.settings.login_delay_s)
        return render(request, "login.html", None, status=401, next=nxt, error="Wrong user name or password.")
    st.limiter.succeeded(client)
    # A new session at login: a session identifier planted before it is worth nothing after.
    request.session.clear()
    request.session.update({"u": ident.name, "t": time.time(), "n": secrets.token_urlsafe(16), "c": new_csrf()})
    log.info("ui: %s (%s) logged in from %s", ident.name, ident.role, client)
    return RedirectResponse(nxt, status_code=303)


async def logout(request: Request) -> Response:
    st = station_of(request)
    check_origin(request)
    form = await read_form(request)
    if not csrf_ok(request.session.get("c"), form.get("csrf")):
        raise HTTPException(403, "refused: the form's CSRF token is missing or stale (reload the page)")
    nonce, started = request.session.get("n"), request.session.get("t")
    if isinstance(nonce, str) and isinstance(started, int | float):
        st.revoked.revoke(nonce, until=started + st.settings.session_max_age_s)
    request.session.clear()
    return RedirectResponse("/login", status_code=303)


# --- pages ---------------------------------------------------------------------------------------


async def live_page(request: Request) -> Response:
    ident = page_user(request)
    st = station_of(request)
    now = time.monotonic()
    return render(
        request,
        "live.html",
        ident,
        panels=st.state.panels(now=now),
        recent=st.state.alerts(),
    )


def live_coil(st: Station) -> tuple[CoilView | None, MapDrawing | None]:
    coil_id = st.state.current_coil_id()
    view = None if coil_id is None else st.state.coil(coil_id)
    if view is None:
        return None, None
    return view, coil_drawing(st, view)


def coil_drawing(st: Station, view: CoilView) -> MapDrawing:
    """The live coil's map: the report's span rule (nominal width, else the cameras' spans, else
    the defects'), MD grown to the furthest of what the cameras reached and the defects."""
    summary = CoilSummary(
        info=CoilInfo(coil_id=view.coil_id, grade=view.grade or "?", head_line=0, width_mm=view.width_mm),
        length_m=max(view.reach_m.values(), default=0.0),
        started_utc=None,
        ended_utc=None,
        defects=view.defects,
        uninspected=(),
        families=view.families,
        grading=view.grading,
        cameras=camera_spans(st.settings.coil),
        thumbs_root=None,
    )

    def href(d: CoilDefect) -> str | None:
        return f"/defect/{d.sources[0]}" if d.sources else None

    return draw_coil_map(
        defects=view.defects,
        families=view.families,
        length_m=grown_length_m(map_length_m(summary)),
        span_mm=strip_span_mm(summary),
        reach_m=view.reach_m,
        href=href,
    )


def camera_spans(coil: CoilConfig) -> dict[str, dict[str, Any]]:
    return {
        cid: {"side": c.side, "cd_from_mm": c.cd_from_mm, "cd_to_mm": c.cd_to_mm} for cid, c in coil.cameras.items()
    }


async def coil_page(request: Request) -> Response:
    ident = page_user(request)
    st = station_of(request)
    view, drawing = live_coil(st)
    past, note = await run_in_threadpool(_past_list, st)
    return render(request, "coil.html", ident, coil=view, drawing=drawing, past=past, past_note=note)


def _past_list(st: Station) -> tuple[list[Any], str | None]:
    if st.past.db is None:
        return [], "ui.coil_db is not set: no coil records to browse."
    records = st.past.records()
    if records is None:
        if st.past.db.exists():
            return [], f"The coil records at {st.past.db} cannot be opened (the station's log says why)."
        return [], f"No coil records at {st.past.db} yet (the coil service makes them)."
    try:
        return [(r, st.past.report_files(r.info.coil_id)) for r in records.coils(limit=st.settings.past_coils)], None
    except RecordsError as err:
        return [], f"Coil records unreadable: {err}"


async def past_coil_page(request: Request) -> Response:
    ident = page_user(request)
    st = station_of(request)
    coil_id = request.path_params["coil_id"]
    summary, drawing, files = await run_in_threadpool(_past_coil, st, coil_id)
    if summary is None:
        raise HTTPException(404, f"no coil {coil_id!r} in the coil records")
    return render(request, "past_coil.html", ident, s=summary, drawing=drawing, files=files)


def _past_coil(st: Station, coil_id: str) -> tuple[CoilSummary | None, MapDrawing | None, list[str]]:
    records = st.past.records()
    if records is None:
        return None, None, []
    try:
        s = coil_summary(records, coil_id, st.settings.coil)
    except RecordsError:
        return None, None, []

    def href(d: CoilDefect) -> str | None:
        return f"/coils/{quote(coil_id, safe='')}/thumb/{d.defect_id}" if d.thumbnail else None

    drawing = draw_coil_map(
        defects=s.defects,
        families=s.families,
        uninspected=s.uninspected,
        length_m=map_length_m(s),
        span_mm=strip_span_mm(s),
        href=href,
    )
    return s, drawing, st.past.report_files(coil_id)


def past_file(request: Request) -> Response:
    api_user(request)
    st = station_of(request)
    coil_id, name = request.path_params["coil_id"], request.path_params["name"]
    path = st.past.report_file(coil_id, name)
    if path is None:
        raise HTTPException(404, f"coil {coil_id!r} has no {name}")
    return FileResponse(path, filename=f"{coil_id}-{name}".replace("/", "_"))


def past_thumb(request: Request) -> Response:
    api_user(request)
    st = station_of(request)
    coil_id, defect_id = request.path_params["coil_id"], request.path_params["defect_id"]
    records = st.past.records()
    rel = None
    if records is not None:
        rel = next((d.thumbnail for d in records.defects(coil_id) if d.defect_id == defect_id), None)
    path = None if rel is None else st.past.thumbnail(rel)
    if path is None:
        raise HTTPException(404, "no such thumbnail")
    return FileResponse(path, media_type="image/png")


def _alert_of(request: Request) -> AlertView | None:
    p = request.path_params  # decoded already: no unquoting again
    journal = p["journal"]
    return station_of(request).state.alert(p["camera"], None if journal == "-" else journal, p["seq"])


async def defect_page(request: Request) -> Response:
    ident = page_user(request)
    st = station_of(request)
    a = _alert_of(request)
    if a is None:
        raise HTTPException(404, "this alert is no longer held by the station (it keeps the last ui.recent_alerts)")
    classes = await known_classes(st, a.camera_id) if ident.operator else []
    heat = st.state.heat_png(*a.key) is not None
    return render(request, "defect.html", ident, a=a, heat=heat, classes=classes)


async def known_classes(st: Station, camera_id: str) -> list[str]:
    """Classes for the label field: the camera's labelled classes (its overlay, asked at most
    every ``CLASSES_TTL_S``) and those recent alerts carry."""
    now = time.monotonic()
    cached = st.classes_cache.get(camera_id)
    if cached is None or now - cached[0] > CLASSES_TTL_S:
        names: list[str] = []
        control = st.settings.controls.get(camera_id)
        if control is not None:
            try:
                reply = await run_in_threadpool(list_overlay, st.context, control, timeout_s=2.0)
                if reply.get("ok"):
                    names = sorted(str(k) for k in (reply.get("classes") or {}))
            except TimeoutError:
                names = cached[1] if cached is not None else []
        st.classes_cache[camera_id] = cached = (now, names)
    return sorted(set(cached[1]) | set(st.state.classes()))


async def overlay_page(request: Request) -> Response:
    ident = page_user(request)
    st = station_of(request)
    replies = await asyncio.gather(
        *(
            run_in_threadpool(_overlay_of, st, cid, control)
            for cid, control in st.settings.controls.items()  # one request per camera, in parallel
        )
    )
    return render(request, "overlay.html", ident, overlays=list(zip(st.settings.controls, replies, strict=True)))


def _overlay_of(st: Station, camera_id: str, control: str) -> dict[str, Any]:
    try:
        return list_overlay(st.context, control, timeout_s=st.settings.overlay_timeout_s)
    except TimeoutError as err:
        return {"ok": False, "error": str(err)}


# --- actions -------------------------------------------------------------------------------------


def _int_field(form: dict[str, str], key: str) -> int:
    try:
        return int(form[key])
    except (KeyError, ValueError):
        raise HTTPException(400, f"field {key!r} must be an integer") from None


def _control(st: Station, camera_id: str) -> str:
    control = st.settings.controls.get(camera_id)
    if control is None:
        raise HTTPException(400, f"unknown camera {camera_id!r}")
    return control


async def _act(
    request: Request,
    ident: Identity,
    form: dict[str, str],
    what: str,
    call: Callable[[], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> Response:
    """Run one feedback request off the loop; a token client gets the daemon's reply as JSON, a
    browser a message on the page it came from."""
    camera = form.get("camera", "")
    try:
        reply = await run_in_threadpool(call)
    except TimeoutError as err:
        reply = {"ok": False, "error": str(err), "timeout": True}
    ok = bool(reply.get("ok"))
    text = f"{camera}: {summary(reply)}" if ok else f"{camera} refused {what}: {reply.get('error', 'no reason given')}"
    log.info("ui: %s (%s) %s on %s: %s", ident.name, ident.via, what, camera, text)
    if ident.via == "token":
        status = 200 if ok else (504 if reply.get("timeout") else 409)
        return JSONResponse({**reply, "camera": camera}, status_code=status)
    request.session["flash"] = {"ok": ok, "text": text}
    return RedirectResponse(safe_next(form.get("next")), status_code=303)


def _journal(form: dict[str, str]) -> str | None:
    j = form.get("journal", "-")
    return None if j in ("", "-") else j


def _entry_text(reply: dict[str, Any]) -> str:
    e = reply.get("entry") or {}
    rows = e.get("rows")
    apply_s = reply.get("apply_s")
    parts = [f"overlay entry {e.get('id', '?')} ({e.get('kind', '?')}"]
    if e.get("class"):
        parts.append(f", class {e['class']}")
    if rows is not None:
        parts.append(f", {rows} rows")
    parts.append(")")
    text = "".join(parts)
    when = f" in {apply_s:.1f} s" if isinstance(apply_s, int | float) else ""
    return f"{text}; the model uses it from the next frame{when}"


async def act_false_alarm(request: Request) -> Response:
    ident, form = await operator_post(request)
    st = station_of(request)
    camera, seq = form.get("camera", ""), _int_field(form, "seq")
    control = _control(st, camera)
    journal = _journal(form)
    return await _act(
        request,
        ident,
        form,
        f"false alarm #{seq}",
        lambda: mark_false_alarm(
            st.context, control, journal=journal, seq=seq, user=ident.name, timeout_s=st.settings.feedback_timeout_s
        ),
        lambda r: f"alert #{seq} marked a false alarm: {_entry_text(r)}",
    )


async def act_label(request: Request) -> Response:
    ident, form = await operator_post(request)
    st = station_of(request)
    camera, seq = form.get("camera", ""), _int_field(form, "seq")
    control = _control(st, camera)
    label = form.get("class", "").strip()
    if not label or len(label) > MAX_CLASS_LEN or any(not ch.isprintable() for ch in label):
        raise HTTPException(400, f"class must be 1 to {MAX_CLASS_LEN} printable characters")
    journal = _journal(form)
    return await _act(
        request,
        ident,
        form,
        f"label #{seq} as {label!r}",
        lambda: label_defect(
            st.context,
            control,
            journal=journal,
            seq=seq,
            label=label,
            user=ident.name,
            timeout_s=st.settings.feedback_timeout_s,
        ),
        lambda r: f"alert #{seq} labelled {label!r}: {_entry_text(r)}",
    )


async def act_undo(request: Request) -> Response:
    ident, form = await operator_post(request)
    st = station_of(request)
    camera, entry = form.get("camera", ""), _int_field(form, "id")
    control = _control(st, camera)
    return await _act(
        request,
        ident,
        form,
        f"undo of overlay entry {entry}",
        lambda: undo_overlay(
            st.context, control, entry=entry, user=ident.name, timeout_s=st.settings.feedback_timeout_s
        ),
        lambda r: f"overlay entry {entry} removed; the model forgets it from the next frame",
    )


# --- live data -------------------------------------------------------------------------------------


def _sse(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'), allow_nan=False)}\n\n"


async def events(request: Request) -> Response:
    api_user(request)
    st = station_of(request)
    sub = st.hub.subscribe(asyncio.get_running_loop())

    async def stream() -> AsyncIterator[str]:
        try:
            yield "retry: 3000\n\n"
            while True:
                batch = await sub.get(KEEPALIVE_S)
                if batch.closed:
                    return
                if identify(request) is None:
                    # Logged out, expired, removed or the token revoked since the stream began: the
                    # browser reconnects, is refused, and goes to the login page.
                    return
                if batch.lost:
                    yield _sse("lost", {"lost": batch.lost})
                for u in batch.updates:
                    yield _sse(u.kind, u.data)
                if not batch.updates and not batch.lost:
                    yield ": keep-alive\n\n"
        finally:
            st.hub.unsubscribe(sub)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )


async def fragment_alerts(request: Request) -> Response:
    api_user(request)
    return fragment(request, "_alerts.html", recent=station_of(request).state.alerts())


async def fragment_cameras(request: Request) -> Response:
    api_user(request)
    return fragment(request, "_cameras.html", panels=station_of(request).state.panels(now=time.monotonic()))


async def fragment_coil(request: Request) -> Response:
    api_user(request)
    view, drawing = live_coil(station_of(request))
    return fragment(request, "_coil.html", coil=view, drawing=drawing)


def preview_jpg(request: Request) -> Response:
    api_user(request)
    f = station_of(request).state.frame(request.path_params["camera"])
    if f is None or f.preview is None:
        raise HTTPException(404, "no preview yet (daemon.preview_px 0, or no frame since the station started)")
    return Response(f.preview, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


def overlay_png(request: Request) -> Response:
    api_user(request)
    got = station_of(request).state.overlay_png(request.path_params["camera"])
    if got is None:
        raise HTTPException(404, "no score map yet (daemon.publish_maps false, or no frame since the station started)")
    return Response(got[1], media_type="image/png", headers={"Cache-Control": "no-store"})


def alert_thumb(request: Request) -> Response:
    api_user(request)
    a = _alert_of(request)
    if a is None or a.thumbnail is None:
        raise HTTPException(404, "no thumbnail")
    return Response(a.thumbnail, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def alert_heat(request: Request) -> Response:
    api_user(request)
    a = _alert_of(request)
    png = None if a is None else station_of(request).state.heat_png(*a.key)
    if png is None:
        raise HTTPException(404, "no heat map of this alert (its frame came without a map, or has not come yet)")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def api_state(request: Request) -> Response:
    """The line as JSON for token clients: cameras and recent alerts (no images)."""
    ident = api_user(request)
    st = station_of(request)
    panels = st.state.panels(now=time.monotonic())
    return JSONResponse(
        {
            "user": {"name": ident.name, "role": ident.role},
            "cameras": [
                {
                    "camera_id": p.camera_id,
                    "state": None if p.view is None else p.view.state,
                    "silent": p.silent,
                    "fps": None if p.view is None else p.view.fps,
                    "frame_id": p.frame_id,
                    "lost": p.lost,
                }
                for p in panels
            ],
            "alerts": [
                {
                    "camera_id": a.camera_id,
                    "journal": a.journal,
                    "seq": a.seq,
                    "coil_id": a.coil_id,
                    "side": a.side,
                    "md_m": a.md_m,
                    "cd_mm": a.cd_mm,
                    "class": a.klass,
                    "max_score": a.max_score,
                    "threshold": a.threshold,
                    "page": f"/defect/{a.path}",
                }
                for a in st.state.alerts()
            ],
        }
    )


def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})


# --- errors, headers, the app ----------------------------------------------------------------------


async def on_login_required(request: Request, exc: Exception) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target, safe='/')}", status_code=303)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    wants_json = "authorization" in request.headers or "application/json" in request.headers.get("accept", "")
    if wants_json or request.url.path.startswith(("/api/", "/events", "/fragments/")):
        return JSONResponse({"ok": False, "error": exc.detail}, status_code=exc.status_code)
    ident = identify(request)
    return render(request, "error.html", ident, status=exc.status_code, code=exc.status_code, detail=exc.detail)


class BodyLimit:
    """Requests carry small forms: a body over ``limit`` bytes is refused (413) before anything
    reads it, or cut off where no length was given, so nobody fills the memory with one POST."""

    def __init__(self, app: ASGIApp, *, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await PlainTextResponse("request body too large\n", status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, counted, send)


class SecurityHeaders:
    """Headers on every response: only this origin's scripts, no framing, no sniffing."""

    def __init__(self, app: ASGIApp, *, tls: bool) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"),
                ]
                if self.tls:
                    headers.append((b"strict-transport-security", b"max-age=31536000"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


async def _tick(st: Station) -> None:
    """The loop's pulse: run_ui feeds the systemd watchdog only while this moves."""
    while True:
        st.tick = time.monotonic()
        await asyncio.sleep(1.0)


def build_app(station: Station, *, secret: str) -> Starlette:
    s = station.settings

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(_tick(station))
        try:
            yield
        finally:
            station.hub.close()
            task.cancel()

    routes = [
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/", live_page),
        Route("/coil", coil_page),
        # Coil IDs come from Level 2 and journal IDs from the daemons: either may hold a '/',
        # which arrives decoded in the path, hence the path converters (the longer routes first).
        Route("/coils/{coil_id:path}/file/{name}", past_file),
        Route("/coils/{coil_id:path}/thumb/{defect_id:int}", past_thumb),
        Route("/coils/{coil_id:path}", past_coil_page),
        Route("/defect/{camera}/{journal:path}/{seq:int}", defect_page),
        Route("/alert/{camera}/{journal:path}/{seq:int}/thumb.png", alert_thumb),
        Route("/alert/{camera}/{journal:path}/{seq:int}/heat.png", alert_heat),
        Route("/overlay", overlay_page),
        Route("/action/false_alarm", act_false_alarm, methods=["POST"]),
        Route("/action/label", act_label, methods=["POST"]),
        Route("/action/undo", act_undo, methods=["POST"]),
        Route("/events", events),
        Route("/fragments/alerts", fragment_alerts),
        Route("/fragments/cameras", fragment_cameras),
        Route("/fragments/coil", fragment_coil),
        Route("/camera/{camera}/preview.jpg", preview_jpg),
        Route("/camera/{camera}/overlay.png", overlay_png),
        Route("/api/state", api_state),
        Route("/healthz", healthz),
        Mount("/static", app=StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        LoginRequiredError: on_login_required,
        HTTPException: on_http_error,
    }
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(SecurityHeaders, tls=s.tls),
            Middleware(BodyLimit),
            Middleware(
                SessionMiddleware,
                secret_key=secret,
                session_cookie=SESSION_COOKIE,
                max_age=s.session_max_age_s,
                same_site="strict",
                https_only=s.tls,
            ),
        ],
        exception_handlers=handlers,
        lifespan=lifespan,
    )
    app.state.station = station
    return app
