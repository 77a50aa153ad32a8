"""A camera daemon's transport, for the bridge tests: its real PUB socket, real alert journal and
real control socket answering ``replay`` (the daemon's own Commands.replay), without the model.

Publishes alerts the way the daemon does (numbered by the journal, then sent), heartbeats and
coil events. The full daemon runs under the bridge in benchmarks/plc_latency.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import zmq

from pipeline.service.control import Commands, ControlServer
from pipeline.service.health import Liveness
from pipeline.transport.journal import AlertJournal
from pipeline.transport.publish import Publisher


class FakeLine:
    def __init__(self, *, tmp: Path, camera_id: str = "cam0", context: zmq.Context) -> None:
        self.camera_id, self.context, self.tmp = camera_id, context, tmp
        self.journal = AlertJournal(path=tmp / f"{camera_id}.sqlite", max_rows=10_000, max_age_s=3600)
        self.pub = Publisher(context=context, endpoint="tcp://127.0.0.1:*", camera_id=camera_id, send_hwm=10_000)
        self.pub.seq["alert"] = self.journal.last_seq
        commands = Commands(
            slot=None,  # type: ignore[arg-type]  # replay needs only the journal
            journal=self.journal,
            replay_limit=100,
            coils=None,  # type: ignore[arg-type]
            status=lambda: {"state": "running"},
            stop=lambda: None,
        )
        self.control = ControlServer(context=context, endpoint="tcp://127.0.0.1:*", secure=None, handle=commands.handle)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.control.run, args=(self._stop, Liveness()), daemon=True)
        self._thread.start()
        self.lock = threading.Lock()

    def alert(self, *, publish: bool = True, **over: Any) -> dict[str, Any]:
        """Journal one alert, and publish it unless ``publish`` is False (a message lost on the way)."""
        now = time.time()
        body = {
            "frame_id": 1,
            "coil_id": "C1",
            "side": "top",
            "line": 100.0,
            "md_m": 10.0,
            "strip_md_m": 10.0,
            "capture_md_m": 10.5,
            "cd_mm": 250.0,
            "length_mm": 12.0,
            "width_mm": 4.0,
            "area_mm2": 40.0,
            "area_px": 30,
            "max_score": 3.0,
            "mean_score": 2.0,
            "threshold": 1.5,
            "box": [1, 2, 3, 4],
            "capture_time": now - 0.02,
            "journal": self.journal.journal_id,
            **over,
        }
        with self.lock:
            header = self.pub.stamp("alert", body)
            self.journal.append([header])
            if publish:
                self.pub.send_stamped(header)
            else:
                self.pub.seq["alert"] += 1
        return header

    def heartbeat(self, state: str = "running", **over: Any) -> None:
        with self.lock:
            self.pub.send(
                "heartbeat",
                {
                    "frame_id": None,
                    "state": state,
                    "recipe": "DC04",
                    "recipes": ["DC01", "DC04"],
                    "coil": {"coil_id": "C1", "md_m": 42.0, "camera_line": 4200},
                    "camera": {"online": state != "camera_offline"},
                    "counts": {"frames_total": 12, "alerts_total": 3},
                    "drops": {"score:queue_full": 2},
                    **over,
                },
            )

    def coil(self, event: str, coil_id: str = "C1") -> None:
        with self.lock:
            self.pub.send("coil", {"frame_id": None, "event": event, "coil_id": coil_id, "grade": "DC04"})

    def restart_journal(self) -> None:
        """The journal file deleted and begun again: a new id, numbers from 1 again."""
        with self.lock:
            self.journal.close()
            for p in self.tmp.glob(f"{self.camera_id}.sqlite*"):
                p.unlink()
            self.journal = AlertJournal(path=self.tmp / f"{self.camera_id}.sqlite", max_rows=10_000, max_age_s=3600)
            self.control._handle.__self__.journal = self.journal  # type: ignore[attr-defined]
            self.pub.seq["alert"] = 0

    @property
    def endpoints(self) -> dict[str, str]:
        return {"pub": self.pub.endpoint, "control": self.control.endpoint}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.control.close()
        self.pub.close()
        self.journal.close()
