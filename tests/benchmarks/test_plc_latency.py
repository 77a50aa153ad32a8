"""benchmarks/plc_latency.py, short: a real daemon, `stripinspect bridge` and a broker as
processes, real OPC UA / Modbus / MQTT clients. Every client gets every alert, the refusals hold,
and a bridge killed mid-stream (SIGKILL) and started again delivers the rest to MQTT, each once.
Latency is the benchmark's business (benchmarks/RESULTS.md), not asserted here."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import plc_latency


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plc")  # one bundle and one PKI for both runs


def test_every_client_gets_every_alert_and_intruders_are_refused(work: Path) -> None:
    out = plc_latency.run(plc_latency.parser().parse_args(["--alerts", "20", "--work", str(work)]))
    n = out["alerts_published"]
    assert n >= 20
    assert (out["opcua_received"], out["modbus_received"], out["mqtt_received"]) == (n, n, n)
    assert out["coil_on_alerts"] == n  # the coil was started through OPC UA's CoilStart
    assert out["opcua_security"] == "Basic256Sha256 SignAndEncrypt, user"
    assert out["unauthenticated_rejected"] is True
    refused = out["refusals"]
    assert "BadIdentityTokenRejected" in refused["anonymous"]
    assert "BadUserAccessDenied" in refused["wrong_password"]
    assert "BadCertificateUntrusted" in refused["untrusted_certificate"]
    assert refused["authorised"] is None
    assert "exception_code=3" in out["modbus_write_refused"]
    assert out["missing_at_bridge"] == [] and out["modbus_missed"] == 0


def test_a_killed_bridge_resumes_from_the_journal_without_duplicates(work: Path) -> None:
    args = ["--alerts", "24", "--kill-bridge-after", "8", "--down-s", "2", "--work", str(work)]
    out = plc_latency.run(plc_latency.parser().parse_args(args))
    assert out["bridge_killed"] is True
    n = out["alerts_published"]
    assert n >= 24
    assert out["mqtt_received"] == n
    assert out["mqtt_duplicates"] == 0
    assert out["missing_at_bridge"] == []
