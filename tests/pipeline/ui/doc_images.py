"""The screenshots in docs/operator.md, from a realistic fake line (``scene.py``): two cameras
(top and bottom) publishing frames of the synthetic strip with planted defects, a heat map and
alerts with thumbnails; the coil service grading the coil and confirming a roll mark; coil
records with past coils and a report.

    PYTHONPATH=. .venv/bin/python -m tests.pipeline.ui.doc_images [OUT_DIR]   # default docs/images
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import zmq
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec

from pipeline.acquisition.synthetic import DefectKind
from pipeline.coil.model import CoilDefect, CoilInfo, Grading, PeriodicFamily, RuleOutcome
from pipeline.coil.records import CoilRecords
from pipeline.config import CoilCameraConfig, CoilConfig
from tests.pipeline.ui.browser import chrome, log_in, screenshot, wait
from tests.pipeline.ui.fakeline import FakeCoilService, FakeDaemon, wait_for
from tests.pipeline.ui.harness import Running, running_station
from tests.pipeline.ui.scene import SCENE, Planted, publish_frame

REPO = Path(__file__).resolve().parents[3]
COIL = "24-118734"
CLASSES = ("scratch", "pit", "scale", "roll mark", "unknown")


def coil_config() -> CoilConfig:
    return CoilConfig(
        cameras={
            "cam0": CoilCameraConfig(
                pub="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1", side="top", cd_from_mm=0.0, cd_to_mm=1250.0
            ),
            "cam1": CoilCameraConfig(
                pub="tcp://127.0.0.1:1", control="tcp://127.0.0.1:1", side="bottom", cd_from_mm=0.0, cd_to_mm=1250.0
            ),
        }
    )


def past_records(folder: Path) -> tuple[Path, Path]:
    """Coil records with three closed coils (one with its report written), as the coil service leaves them."""
    from pipeline.coil.report import write_report
    from pipeline.coil.service import coil_summary, safe_name

    db, reports = folder / "coils.sqlite", folder / "reports"
    rng = np.random.default_rng(3)
    with CoilRecords(path=db, synchronous="NORMAL") as records:
        for k, (coil_id, disposition) in enumerate(
            (("24-118731", "prime"), ("24-118732", "secondary"), ("24-118733", "hold"))
        ):
            started = time.time() - (4 - k) * 900
            records.open_coil(
                CoilInfo(coil_id=coil_id, grade="DC04", head_line=k * 2_000_000, width_mm=1250.0), started_utc=started
            )
            for i in range(int(rng.integers(6, 20))):
                d = CoilDefect(
                    coil_id=coil_id,
                    side="top" if i % 3 else "bottom",
                    md_m=float(rng.uniform(5, 790)),
                    cd_mm=float(rng.uniform(30, 1220)),
                    length_mm=float(rng.uniform(3, 40)),
                    width_mm=float(rng.uniform(2, 15)),
                    area_mm2=float(rng.uniform(5, 300)),
                    score=float(rng.uniform(2.2, 6)),
                    cameras=("cam0",),
                    sources=(),
                    klass=CLASSES[i % 4],
                )
                records.add_defect(d, camera="cam0", seq=k * 100 + i + 1, merge_mm=10.0, thumbnail_png=None)
            outcome = RuleOutcome("density", 1.2 + k, 2.0, disposition != "prime", disposition)
            records.set_results(coil_id, families=(), grading=Grading("DC04", disposition, (outcome,), True))
            records.close_coil(coil_id, tail_line=k * 2_000_000 + 1_600_000, length_m=800.0, ended_utc=started + 800)
        s = coil_summary(records, "24-118733", CoilConfig())
        write_report(s, reports / safe_name("24-118733"))
    return db, reports


def feed(r: Running, coil_service: FakeCoilService) -> None:
    """The coil so far: 380 m of both sides with defects, the latest frame of each camera."""
    rng = np.random.default_rng(11)
    for d in r.daemons.values():
        d.coil("start", COIL)
    # Defects along the coil: a few frames' worth of alerts per camera (each frame 0.25 m).
    for k in range(26):
        cam = r.daemons["cam0" if k % 3 else "cam1"]
        md = float(rng.uniform(5, 375))
        kind: DefectKind = ("scratch", "pit", "scale", "pit", "roll_mark")[k % 5]
        klass = CLASSES[k % 5] if kind != "roll_mark" else "roll mark"
        planted = [
            Planted(
                kind,
                int(rng.integers(60, 450)),
                int(rng.integers(80, 690)),
                {"scratch": 60, "pit": 12, "scale": 36, "roll_mark": 16}[kind],
                klass,
            )
        ]
        offset = float(rng.choice([0.0, 430.0, 860.0]))  # where this frame's defect lies across the strip
        publish_frame(cam, planted=planted, coil_md_m=md, first_line=4000 * k, coil_id=COIL, cd_offset_mm=offset)
        time.sleep(0.01)
    # The roll mark: every 1.759 m on the top side at 480 mm.
    family = PeriodicFamily(
        side="top",
        cd_mm=480.0,
        period_m=1.7593,
        phase_m=212.4,
        count=8,
        confidence=0.9,
        md_m=tuple(212.4 + 1.7593 * i for i in range(9) if i != 5),
        confirmed=True,
        roll="work roll top",
    )
    coil_service.periodic(COIL, family)
    outcomes = (
        RuleOutcome("density", 1.6, 2.0, False, "secondary"),
        RuleOutcome("density", 1.1, 1.0, True, "hold"),
        RuleOutcome("edge", 0.0, 20.0, False, "secondary"),
        RuleOutcome("size", 180.0, 500.0, False, "scrap"),
        RuleOutcome("periodic", 1.0, 0.0, True, "hold"),
        RuleOutcome("uninspected", 0.0, 1.0, False, "hold"),
    )
    coil_service.grading(COIL, Grading("DC04", "hold", outcomes, False))
    # The latest frames: the scene on top, two defects underneath.
    publish_frame(r.daemons["cam0"], planted=SCENE, coil_md_m=381.4, first_line=800_000, coil_id=COIL)
    bottom = [Planted("pit", 200, 300, 12, "pit"), Planted("scratch", 330, 560, 50, "scratch")]
    publish_frame(r.daemons["cam1"], planted=bottom, coil_md_m=381.2, first_line=800_000, coil_id=COIL)
    for d in r.daemons.values():
        d.heartbeat(coil={"coil_id": COIL, "md_m": 381.6, "camera_line": 4200})
    wait_for(lambda: (v := r.station.state.coil(COIL)) is not None and v.grading is not None, what="the coil's grading")


@contextmanager
def realistic_station(tmp: Path, context: zmq.Context) -> Iterator[Running]:
    daemons = [
        FakeDaemon(context=context, camera_id="cam0", side="top"),
        FakeDaemon(context=context, camera_id="cam1", side="bottom"),
    ]
    coil_service = FakeCoilService(context=context)
    db, reports = past_records(tmp)
    try:
        with running_station(
            tmp,
            context=context,
            daemons=daemons,
            coil_pub=coil_service.pub.endpoint,
            coil=coil_config(),
            coil_db=db,
            reports_dir=reports,
        ) as r:
            r.until_following()
            wait_for(lambda: _coil_service_follows(r, coil_service), what="the coil service subscription")
            feed(r, coil_service)
            yield r
    finally:
        coil_service.close()
        for d in daemons:
            d.close()


def _coil_service_follows(r: Running, cs: FakeCoilService) -> bool:
    cs.closed("probe-coil")
    time.sleep(0.05)
    return r.station.state.coil("probe-coil") is not None


def main(out: Path) -> None:
    context = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp, realistic_station(Path(tmp), context) as r:
        driver = chrome(width=1500, height=980)
        try:
            log_in(driver, r.url, "op")
            driver.execute_script(
                "localStorage.setItem('overlay:cam0', 'on'); localStorage.setItem('overlay:cam1', 'on');"
            )
            driver.get(r.url + "/")
            wait(driver).until(
                ec.visibility_of_element_located((By.CSS_SELECTOR, ".frame-view.show-overlay img.overlay"))
            )
            time.sleep(0.5)
            driver.set_window_size(1500, 820)  # frames and the latest alerts, no empty page below
            screenshot(driver, out / "ui_live.png")
            driver.set_window_size(1500, 980)
            driver.get(r.url + "/coil")
            wait(driver).until(ec.presence_of_element_located((By.CSS_SELECTOR, "svg.coilmap circle.defect")))
            time.sleep(0.3)
            screenshot(driver, out / "ui_coil.png", full_page=True)
            # The defect page of the latest frame's hottest alert, with its heat-map crop.
            hottest = max(r.station.state.alerts(), key=lambda a: (a.frame_id == r.daemons["cam0"].frame_id, a.ratio))
            driver.get(f"{r.url}/defect/{hottest.path}")
            wait(driver).until(ec.presence_of_element_located((By.ID, "heat-crop")))
            driver.set_window_size(1500, 760)
            screenshot(driver, out / "ui_defect.png")
        finally:
            driver.quit()
    context.term()
    print(f"wrote {out / 'ui_live.png'}, {out / 'ui_coil.png'} and {out / 'ui_defect.png'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "images")
