"""A reject actuator downstream of the camera: pure arithmetic on an alert (``fire_time``), and
an actuator played on the live alert stream (``simulate_reject``, `stripinspect reject-sim`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.transport.listen import listen


def fire_time(alert: dict[str, Any], *, speed_m_s: float, distance_m: float) -> float:
    """When the defect reaches an actuator ``distance_m`` downstream of the camera line.

    At ``capture_time`` the camera saw MD ``capture_md_m``; the defect (at ``md_m``) was
    already ``capture_md_m - md_m`` past the camera then.
    """
    if speed_m_s <= 0 or distance_m < 0:
        raise ValueError(f"speed must be > 0 and distance >= 0, got {speed_m_s}, {distance_m}")
    already = float(alert["capture_md_m"]) - float(alert["md_m"])
    return float(alert["capture_time"]) + (distance_m - already) / speed_m_s


@dataclass(frozen=True)
class Firing:
    """One alert as the actuator sees it: when to fire, and how much time was left to act
    (``margin_s`` < 0: the alert came too late)."""

    seq: int
    md_m: float
    cd_mm: float
    fire_time: float
    margin_s: float  # rounded to 0.1 ms
    late: bool


@dataclass(frozen=True)
class RejectReport:
    alerts: int
    late: int
    smallest_margin_s: float | None  # None: no alert came
    gaps: int  # alert sequence gaps (alerts lost between daemon and actuator)


def simulate_reject(
    *,
    endpoint: str,
    speed_m_s: float,
    distance_m: float,
    lead_s: float,
    stop: Callable[[], bool],
    on_firing: Callable[[Firing], None],
    clock: Callable[[], float] = time.time,
) -> RejectReport:
    """Play a reject actuator ``distance_m`` downstream of the camera on a line at ``speed_m_s``
    that needs its command ``lead_s`` ahead: subscribe to the daemon's alerts at ``endpoint``
    until ``stop()``, and hand each alert's firing to ``on_firing`` as it arrives."""
    margins: list[float] = []

    def on_alert(topic: str, header: dict[str, Any]) -> None:
        now = clock()
        fire = fire_time(header, speed_m_s=speed_m_s, distance_m=distance_m)
        margin = fire - lead_s - now
        margins.append(margin)
        on_firing(
            Firing(
                seq=header["seq"],
                md_m=header["md_m"],
                cd_mm=header["cd_mm"],
                fire_time=fire,
                margin_s=round(margin, 4),
                late=margin < 0,
            )
        )

    report = listen(endpoint=endpoint, topics=("alert",), on_message=on_alert, stop=stop)
    return RejectReport(
        alerts=len(margins),
        late=sum(m < 0 for m in margins),
        smallest_margin_s=min(margins) if margins else None,
        gaps=len(report.gaps),
    )
