"""A camera daemon's and the coil service's transport for the station tests, without a model.

``FakeDaemon``: the daemon's real PUB socket (``pipeline.transport.publish.Publisher``) and a
real REP control socket answering the operator feedback commands as docs/messages.md describes
them (false_alarm, label, overlay, overlay_undo), recording every request. The overlay is a list
of entries, not patch rows: what the station sends and shows is under test, not the model (the
daemon's side has its own tests). ``FakeCoilService``: the coil service's PUB (grading, periodic,
coil_closed)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict
from typing import Any

import cv2
import numpy as np
import zmq

from pipeline.coil.model import Grading, PeriodicFamily
from pipeline.transport.publish import Publisher


def wait_for(cond: Any, *, timeout_s: float = 10.0, what: str = "condition") -> Any:
    """Poll ``cond()`` until it returns something true; its value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


class FakeDaemon:
    def __init__(
        self,
        *,
        context: zmq.Context,
        camera_id: str = "cam0",
        side: str = "top",
        journal: str | None = "j-test",
        max_score_ratio: float = 2.0,
    ) -> None:
        self.camera_id, self.side, self.journal = camera_id, side, journal
        self.max_score_ratio = max_score_ratio
        self.pub = Publisher(context=context, endpoint="tcp://127.0.0.1:*", camera_id=camera_id, send_hwm=10_000)
        self._rep = context.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        self._rep.bind("tcp://127.0.0.1:*")
        self.control = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self.calls: list[dict[str, Any]] = []
        self.entries: list[dict[str, Any]] = []
        self.sent: dict[tuple[str | None, int], dict[str, Any]] = {}
        self._next_id = 1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fake-{camera_id}-control", daemon=True)
        self._thread.start()
        self.frame_id = 0

    # --- control ---------------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._rep.poll(50):
                continue
            req = json.loads(self._rep.recv())
            with self._lock:
                self.calls.append(req)
                reply = self._handle(req)
            self._rep.send_json(reply)

    def calls_of(self, cmd: str) -> list[dict[str, Any]]:
        with self._lock:
            return [c for c in self.calls if c.get("cmd") == cmd]

    def _overlay(self) -> dict[str, Any]:
        classes: dict[str, int] = {}
        for e in self.entries:
            if e["kind"] == "label" and e.get("removed_time") is None:
                classes[e["class"]] = classes.get(e["class"], 0) + 1
        rows = sum(e["rows"] for e in self.entries if e["kind"] == "normal" and e.get("removed_time") is None)
        return {"version": len(self.calls), "sha256": "ab" * 32, "rows": rows, "cap_rows": 20_000, "classes": classes}

    def _handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd in ("false_alarm", "label"):
            key = (req.get("journal"), int(req.get("seq", -1)))
            alert = self.sent.get(key)
            if alert is None:
                return {"ok": False, "error": f"alert {key[1]} of journal {key[0]} is no longer kept"}
            ratio = alert["max_score"] / alert["threshold"]
            if cmd == "false_alarm" and ratio > self.max_score_ratio:
                return {
                    "ok": False,
                    "error": f"alert {key[1]}: max score {ratio:.1f} x the threshold is above "
                    f"feedback.max_score_ratio {self.max_score_ratio}: not taken as normal",
                }
            entry = {
                "id": self._next_id,
                "kind": "normal" if cmd == "false_alarm" else "label",
                "user": req.get("user"),
                "time": time.time(),
                "alert": {"camera_id": self.camera_id, "journal": key[0], "seq": key[1]},
                "rows": 24 if cmd == "false_alarm" else 1,
                "class": req.get("class") if cmd == "label" else None,
            }
            self._next_id += 1
            self.entries.append(entry)
            return {"ok": True, "entry": entry, "apply_s": 0.8}
        if cmd == "overlay":
            return {"ok": True, **self._overlay(), "entries": list(self.entries)}
        if cmd == "overlay_undo":
            entry_id = req.get("id")
            found = next((e for e in self.entries if e["id"] == entry_id), None)
            if found is None:
                return {"ok": False, "error": f"no overlay entry {entry_id}"}
            if found.get("removed_time") is not None:
                return {"ok": False, "error": f"overlay entry {entry_id} was removed already"}
            # As the daemon: the entry stays in the list, marked removed (who taught what stays known).
            found.update(removed_by=req.get("user"), removed_time=time.time())
            return {"ok": True, "removed": found}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    # --- published messages ------------------------------------------------------------------

    def alert(self, **over: Any) -> dict[str, Any]:
        """Publish one alert; its header (with ``seq``) is returned and kept for feedback."""
        body = {
            "frame_id": self.frame_id,
            "capture_time": time.time() - 0.05,
            "capture_md_m": 12.5,
            "class": "unknown",
            "class_confidence": None,
            "coil_id": "C1",
            "side": self.side,
            "line": 5000.0,
            "md_m": 12.0,
            "strip_md_m": 112.0,
            "cd_mm": 300.0,
            "length_mm": 14.0,
            "width_mm": 6.0,
            "area_mm2": 60.0,
            "area_px": 240,
            "max_score": 3.0,
            "mean_score": 2.1,
            "threshold": 2.0,
            "box": [100, 200, 28, 12],
            "thumbnail_png": None,
            "journal": self.journal,
            **over,
        }
        header = self.pub.stamp("alert", body)
        header["seq"] = self.pub.seq["alert"] + 1
        with self._lock:
            self.sent[(header["journal"], header["seq"])] = header
        self.pub.send_stamped(header)
        return header

    def frame(
        self,
        *,
        image: np.ndarray | None = None,
        score_map: np.ndarray | None = None,
        threshold: float = 2.0,
        preview_px: int = 512,
        frame_id: int | None = None,
        **over: Any,
    ) -> int:
        """Publish a frame with a JPEG preview of ``image`` and/or the float16 ``score_map``, both
        of the valid rows; returns its frame_id."""
        self.frame_id = frame_id if frame_id is not None else self.frame_id + 1
        names: list[str] = []
        parts: list[bytes] = []
        header: dict[str, Any] = {}
        rows = 0
        if score_map is not None:
            names.append("map")
            parts.append(score_map.astype("<f2").tobytes())
            header.update(map_shape=list(score_map.shape), map_dtype="float16 little-endian")
            rows = score_map.shape[0]
        if image is not None:
            h, w = image.shape[:2]
            small = cv2.resize(image, (preview_px, max(1, round(h * preview_px / w))), interpolation=cv2.INTER_AREA)
            ok, jpg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 85])
            assert ok
            names.append("preview")
            parts.append(jpg.tobytes())
            header.update(preview_shape=list(small.shape[:2]))
            rows = h
        body = {
            **header,
            "parts": names,
            "frame_id": self.frame_id,
            "capture_time": time.time() - 0.05,
            "first_line": 0,
            "coil_id": "C1",
            "side": self.side,
            "md_m": 10.0,
            "strip_md_m": 110.0,
            "mm_per_line": 0.5,
            "lines": rows,
            "valid_rows": [0, rows],
            "max_score": float(score_map.max()) if score_map is not None else 0.0,
            "defects": 0,
            "threshold": threshold,
            "strip_edges_px": None,
            **over,
        }
        self.pub.send("frame", body, tuple(parts))
        return self.frame_id

    def heartbeat(self, state: str = "running", **over: Any) -> None:
        self.pub.send(
            "heartbeat",
            {
                "frame_id": None,
                "capture_time": None,
                "state": state,
                "recipe": "DC04",
                "recipes": ["DC01", "DC04"],
                "coil": {"coil_id": "C1", "md_m": 42.0, "camera_line": 4200},
                "side": self.side,
                "camera": {"online": state != "camera_offline", "state": "online", "width": 2048},
                "counts": {"frames_total": 10 * self.pub.seq["heartbeat"], "alerts_total": self.pub.seq["alert"]},
                "drops": {"score:queue_full": 1},
                "latency_seconds": {"end_to_end": {"p50": 0.2, "p95": 0.3, "p99": 0.35}},
                "threshold": 2.0,
                "drift": {"drift_ratio": 1.02, "drifting": False},
                **over,
            },
        )

    def coil(self, event: str, coil_id: str = "C1", **over: Any) -> None:
        self.pub.send(
            "coil",
            {
                "frame_id": None,
                "capture_time": time.time(),
                "event": event,
                "coil_id": coil_id,
                "grade": "DC04",
                "width_mm": 1250.0,
                "thickness_mm": 0.7,
                "length_m": 2400.0,
                "side": self.side,
                **over,
            },
        )

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._rep.close(0)
        self.pub.close()


class FakeCoilService:
    def __init__(self, *, context: zmq.Context) -> None:
        self.pub = Publisher(
            context=context,
            endpoint="tcp://127.0.0.1:*",
            camera_id="coil-service",
            send_hwm=10_000,
            topics=("periodic", "grading", "coil_closed"),
        )

    def grading(self, coil_id: str, grading: Grading) -> None:
        self.pub.send("grading", {"coil_id": coil_id, "frame_id": None, **asdict(grading)})

    def periodic(self, coil_id: str, family: PeriodicFamily) -> None:
        self.pub.send("periodic", {"coil_id": coil_id, "frame_id": None, **asdict(family)})

    def closed(self, coil_id: str, **over: Any) -> None:
        body = {"coil_id": coil_id, "frame_id": None, "disposition": "hold", "length_m": 812.0, "families": 1}
        self.pub.send("coil_closed", {**body, **over})

    def close(self) -> None:
        self.pub.close()
