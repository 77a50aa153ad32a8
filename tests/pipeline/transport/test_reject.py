import json
import threading

import pytest
import zmq

from pipeline.transport.listen import deadline
from pipeline.transport.reject import Firing, RejectReport, fire_time, simulate_reject


def test_fire_time_accounts_for_what_already_passed() -> None:
    alert = {"capture_time": 100.0, "capture_md_m": 50.0, "md_m": 49.5}
    # 0.5 m already past the camera, actuator 3 m downstream, 2 m/s -> 1.25 s after capture.
    assert fire_time(alert, speed_m_s=2.0, distance_m=3.0) == pytest.approx(101.25)


def test_fire_time_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        fire_time({"capture_time": 0, "capture_md_m": 0, "md_m": 0}, speed_m_s=0, distance_m=1)


def _send(sock: zmq.Socket, topic: str, **header: object) -> None:
    sock.send_multipart([topic.encode(), json.dumps({"topic": topic, **header}).encode()])


def test_simulated_actuator_fires_each_alert_and_reports_late_ones_and_gaps() -> None:
    # Real ZeroMQ on 127.0.0.1 at a random port; an XPUB sees the subscription arrive, so no
    # alert is sent before the actuator listens (PUB drops for subscribers not yet joined).
    ctx = zmq.Context()
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    firings: list[Firing] = []
    box: dict[str, RejectReport] = {}
    thread = threading.Thread(
        target=lambda: box.update(
            report=simulate_reject(
                endpoint=f"tcp://127.0.0.1:{port}",
                speed_m_s=2.0,
                distance_m=3.0,
                lead_s=0.02,
                stop=deadline(10.0),
                on_firing=firings.append,
                clock=lambda: 1000.0,
            )
        )
    )
    thread.start()
    try:
        subscribed: set[bytes] = set()
        while subscribed != {b"alert", b"heartbeat"}:
            assert pub.poll(5000), "the actuator never subscribed"
            subscribed.add(pub.recv()[1:])  # b"\x01" + topic
        alert = {"capture_md_m": 50.0, "md_m": 49.5, "cd_mm": 12.0}
        _send(pub, "alert", seq=1, capture_time=1000.0, **alert)  # fires at 1001.25: 1.23 s to spare
        _send(pub, "alert", seq=3, capture_time=990.0, **alert)  # fires at 991.25: too late; seq 2 lost
        _send(pub, "heartbeat", seq=1, state="stopped")
        thread.join(10.0)
    finally:
        pub.close(0)
        ctx.term()
    assert not thread.is_alive()
    assert firings == [
        Firing(seq=1, md_m=49.5, cd_mm=12.0, fire_time=1001.25, margin_s=1.23, late=False),
        Firing(seq=3, md_m=49.5, cd_mm=12.0, fire_time=991.25, margin_s=-8.77, late=True),
    ]
    report = box["report"]
    assert report.alerts == 2 and report.late == 1 and report.gaps == 1
    assert report.smallest_margin_s == pytest.approx(-8.77)
