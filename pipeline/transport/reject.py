"""A reject actuator downstream of the camera, as pure arithmetic on an alert."""

from __future__ import annotations

from typing import Any


def fire_time(alert: dict[str, Any], *, speed_m_s: float, distance_m: float) -> float:
    """When the defect reaches an actuator ``distance_m`` downstream of the camera line.

    At ``capture_time`` the camera saw MD ``capture_md_m``; the defect (at ``md_m``) was
    already ``capture_md_m - md_m`` past the camera then.
    """
    if speed_m_s <= 0 or distance_m < 0:
        raise ValueError(f"speed must be > 0 and distance >= 0, got {speed_m_s}, {distance_m}")
    already = float(alert["capture_md_m"]) - float(alert["md_m"])
    return float(alert["capture_time"]) + (distance_m - already) / speed_m_s
