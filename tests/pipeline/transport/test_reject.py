import pytest

from pipeline.transport.reject import fire_time


def test_fire_time_accounts_for_what_already_passed() -> None:
    alert = {"capture_time": 100.0, "capture_md_m": 50.0, "md_m": 49.5}
    # 0.5 m already past the camera, actuator 3 m downstream, 2 m/s -> 1.25 s after capture.
    assert fire_time(alert, speed_m_s=2.0, distance_m=3.0) == pytest.approx(101.25)


def test_fire_time_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        fire_time({"capture_time": 0, "capture_md_m": 0, "md_m": 0}, speed_m_s=0, distance_m=1)
