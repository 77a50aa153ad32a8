"""A line in coil terms, end to end: camera daemons on both sides of one synthetic coil, the
proxy, the coil service and its report, checked against what was planted (issue 16).

    python benchmarks/coil_line.py --json runs/coil_line.json [--length-m 300] [--kill cam1]

Each camera is a real ``stripinspect run`` process on its CD slice of the strip (2 per side by
default, small frames, paced by the wall clock), with its own alert journal; ``stripinspect
proxy`` fans their streams in; ``stripinspect coil-service`` writes the coil record and, at the
coil's end, the report. A schedule file gives the coil (the cameras place it by strip line).
The top side carries a roll mark at the circumference of the roll table's top work roll.
With ``--kill CAM`` that camera's daemon is killed (SIGKILL) at ``--kill-at`` of the coil and
started again ``--down-s`` later where the strip then is: its stretch in between must come out
as uninspected, and nothing it published may be missing from the record.

JSON keys: cameras, planted, found, false_alerts, lost_alerts, periodic_planted_m,
periodic_found_m, roll_planted, roll_found, report_pdf, report_png, report_json, plus recall,
planted_uninspected, uninspected_m, disposition, wall_s, line_rate_hz, length_m.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.acquisition.synthetic import SyntheticStrip  # noqa: E402
from pipeline.acquisition.synthetic_coil import (  # noqa: E402
    CoilCamera,
    coil_cameras,
    nominal_edges_px,
    planted_on_strip,
    roll_for_side,
    to_coil,
)
from pipeline.coil.records import CoilRecords  # noqa: E402
from pipeline.config import Config, SourceConfig  # noqa: E402

COIL = "24-118734"
GRADE = "DC01"
HEAD_M = 12.0  # the coil head passes the cameras this far into the run (the services are up by then)
STRIP_WIDTH_MM = 1250.0
MATCH_MM = 20.0  # a record defect matches a planted one when their boxes come this close


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fit_bundle_for(work: Path, cams: list[CoilCamera], *, frame_lines: int, strip_width: int) -> Path:
    """One bundle for every camera: normal frames of each camera's slice of both sides."""
    bundle = work / "bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    from export.fit import fit_bundle
    from pipeline.config import ChooseConfig, CoresetConfig, FitConfig

    data = work / "train" / "good"
    data.mkdir(parents=True, exist_ok=True)
    for cam in cams:
        strip = SyntheticStrip(width=strip_width, seed=cam.seed)
        for k in range(6):
            img = strip.render_normal(10_000_000 + k * frame_lines, frame_lines)
            img8 = np.clip(np.rint(img), 0, 255).astype(np.uint8)[:, cam.strip_x0 : cam.strip_x0 + cam.width]
            cv2.imwrite(str(data / f"{cam.side}_{cam.strip_x0}_{k}.png"), img8)
    cfg = Config(
        fit=FitConfig(scale=1.0, coreset=CoresetConfig(max_rows=8192, ratio=0.05), choose=ChooseConfig(images=0))
    )
    fit_bundle(data=data, out=bundle, cfg=cfg, progress=False)
    return bundle


def calibrate_threshold(bundle: Path, cams: list[CoilCamera], *, frame_lines: int, strip_width: int) -> float:
    """1.1 x the highest pixel score on normal strip none of the cameras was fitted on."""
    from calibration.thresholds import threshold_above_normal
    from pipeline.config import RuntimeConfig, ScoringConfig
    from pipeline.inference.backends import open_backend

    scorer = open_backend(bundle, runtime=RuntimeConfig(), scoring=ScoringConfig()).frame_scorer(tile=None, margin=0)
    frames = []
    for cam in cams:
        strip = SyntheticStrip(width=strip_width, seed=cam.seed)
        for k in range(2):
            img = strip.render_normal(20_000_000 + k * frame_lines, frame_lines)
            frames.append(
                np.clip(np.rint(img), 0, 255).astype(np.uint8)[:, cam.strip_x0 : cam.strip_x0 + cam.width, None]
            )
    return threshold_above_normal(scorer, frames, factor=1.1)


def camera_config(
    *,
    cam: CoilCamera,
    cid: str,
    args: argparse.Namespace,
    work: Path,
    bundle: Path,
    threshold: float,
    endpoints: dict[str, dict[str, str]],
    strip_width: int,
    total_lines: int,
    first_line: int,
    coil: dict[str, Any],
) -> dict[str, Any]:
    return {
        "synthetic": {"width": cam.width, "seed": cam.seed},
        "runtime": {"onnx_threads": 1, "faiss_threads": 1},
        "coil": coil,
        "daemon": {
            "bundle": str(bundle),
            "camera_id": cid,
            "side": cam.side,
            "cd_offset_mm": cam.cd_offset_mm,
            "strip_edge_px": 0.0,
            "frame_lines": args.frame_lines,
            "overlap_lines": args.overlap_lines,
            "mm_per_px": args.mm_per_px,
            "mm_per_line": args.mm_per_line,
            "threshold": threshold,
            "min_area_px": 8,
            "thumbnail_px": 48,
            "heartbeat_s": 0.5,
            "metrics_port": None,
            "pub_endpoint": endpoints[cid]["pub"],
            "control_endpoint": endpoints[cid]["control"],
            "coil_schedule": str(work / "coils.csv"),
            "journal": {"path": str(work / f"journal_{cid}.sqlite"), "synchronous": "NORMAL"},
            "source": {
                "kind": "synthetic",
                "block_lines": 128,
                "line_rate_hz": args.line_rate,
                "strip_lines": total_lines,
                "first_line": 0,
                "resume_line": first_line or None,
                "strip_width": strip_width,
                "strip_x0": cam.strip_x0,
                "defects_per_100_frames": args.defects_per_100_frames,
                "roll_period_lines": cam.roll_period_lines if cam.side == "top" else None,
            },
        },
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps it
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "stripinspect", *cmd], stdout=out, stderr=out, env=env, cwd=REPO)


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    """SIGTERM to every process still running (they drain in parallel), then wait; kill a late one."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def control(endpoint: str, msg: dict[str, Any], timeout_s: float = 5.0, patience_s: float = 30.0) -> dict[str, Any]:
    """A control request, asked again on a fresh socket while it times out, for up to
    ``patience_s``: the coil service answers between its gap fills, and a fill from a camera
    that was just killed waits its ``replay_timeout_s`` first (a busy loaded machine adds more)."""
    import zmq

    from pipeline.transport.request import request

    ctx: zmq.Context = zmq.Context.instance()
    give_up = time.monotonic() + patience_s
    while True:
        try:
            return request(ctx, endpoint, msg, timeout_s=timeout_s)
        except TimeoutError:
            if time.monotonic() >= give_up:
                raise


def match(truth: list[Any], defects: list[Any]) -> tuple[set[int], set[int]]:
    """(indices of planted prints found, indices of record defects that match a planted one)."""
    found, used = set(), set()
    for i, t in enumerate(truth):
        for j, d in enumerate(defects):
            if d.side != t.side:
                continue
            md_gap = abs(d.md_m - t.md_m) * 1000 - (d.length_mm + t.length_mm) / 2
            cd_gap = abs(d.cd_mm - t.cd_mm) - (d.width_mm + t.width_mm) / 2
            if md_gap <= MATCH_MM and cd_gap <= MATCH_MM:
                found.add(i)
                used.add(j)
    return found, used


def in_uninspected(t: Any, stretches: list[Any], spans: dict[str, tuple[str, float, float]]) -> bool:
    """A planted print no camera could see: inside an uninspected stretch and not inside the
    span of another camera of its side that was inspecting then."""
    down = [u for u in stretches if u.side == t.side and u.md_from_m <= t.md_m <= u.md_to_m]
    if not down:
        return False
    seeing = [
        cid
        for cid, (side, lo, hi) in spans.items()
        if side == t.side and lo <= t.cd_mm <= hi and not any(u.camera == cid for u in down)
    ]
    return not seeing


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg0 = Config()
    mm_line, mm_px = args.mm_per_line, args.mm_per_px
    cams = coil_cameras(
        seed=args.seed,
        strip_width=args.strip_width,
        cameras_per_side=args.cameras_per_side,
        overlap_px=args.overlap_px,
        mm_per_px=mm_px,
        mm_per_line=mm_line,
        rolls=cfg0.coil.rolls,
    )
    ids = [f"cam{i}" for i in range(len(cams))]
    left = nominal_edges_px(args.strip_width)[0]
    t_fit = time.monotonic()
    bundle = fit_bundle_for(work, cams, frame_lines=args.frame_lines, strip_width=args.strip_width)
    threshold = calibrate_threshold(bundle, cams, frame_lines=args.frame_lines, strip_width=args.strip_width)
    fit_s = time.monotonic() - t_fit
    head = round(HEAD_M * 1000 / mm_line)
    tail = head + round(args.length_m * 1000 / mm_line)
    total = tail + 2 * args.frame_lines  # the last frames reach past the tail
    (work / "coils.csv").write_text(
        "coil_id,grade,head_m,length_m,width_mm,thickness_mm\n"
        f"{COIL},{GRADE},{head * mm_line / 1000},{(tail - head) * mm_line / 1000},{STRIP_WIDTH_MM},0.7\n",
        encoding="utf-8",
    )
    endpoints = {
        cid: {"pub": f"tcp://127.0.0.1:{free_port()}", "control": f"tcp://127.0.0.1:{free_port()}"} for cid in ids
    }
    spans: dict[str, tuple[str, float, float]] = {}
    for cid, cam in zip(ids, cams, strict=True):
        lo = cam.cd_offset_mm
        spans[cid] = (cam.side, lo, lo + cam.width * mm_px)
    for db in work.glob("journal_*.sqlite*"):
        db.unlink()
    for db in (work / "records").glob("coils.sqlite*"):
        db.unlink()
    coil: dict[str, Any] = {
        "cameras": {
            cid: {**endpoints[cid], "side": spans[cid][0], "cd_from_mm": spans[cid][1], "cd_to_mm": spans[cid][2]}
            for cid in ids
        },
        "proxy_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "control_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "pub_endpoint": f"tcp://127.0.0.1:{free_port()}",
        "db": {"path": str(work / "records" / "coils.sqlite"), "synchronous": "NORMAL"},
        "reports_dir": str(work / "reports"),
        "camera_timeout_s": 5.0,
    }
    service_cfg = write_yaml(work / "coil.yaml", {"coil": coil})
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def daemon(cid: str, cam: CoilCamera, first_line: int) -> subprocess.Popen[bytes]:
        c = camera_config(
            cam=cam,
            cid=cid,
            args=args,
            work=work,
            bundle=bundle,
            threshold=threshold,
            endpoints=endpoints,
            strip_width=args.strip_width,
            total_lines=total,
            first_line=first_line,
            coil=coil,
        )
        path = write_yaml(work / f"{cid}.yaml", c)
        return start(["run", "--config", str(path), "--quiet"], logs / f"{cid}.log")

    t0 = time.monotonic()
    try:
        procs["coil-service"] = start(["coil-service", "--config", str(service_cfg)], logs / "coil-service.log")
        procs["proxy"] = start(["proxy", "--config", str(service_cfg)], logs / "proxy.log")
        time.sleep(1.0)
        for cid, cam in zip(ids, cams, strict=True):
            procs[cid] = daemon(cid, cam, 0)
        killed = False
        deadline = time.monotonic() + args.timeout_s
        closed = None
        while time.monotonic() < deadline:
            time.sleep(1.0)
            for name, p in procs.items():
                if p.poll() is not None and name in ("coil-service", "proxy"):
                    raise RuntimeError(f"{name} exited with {p.returncode}; see {logs / (name + '.log')}")
            status = control(coil["control_endpoint"], {"cmd": "status"})
            if args.kill and not killed:
                line = max((c["covered_to"] or 0) for c in status["cameras"].values())
                if line >= head + args.kill_at * (tail - head):
                    procs[args.kill].send_signal(signal.SIGKILL)
                    procs[args.kill].wait()
                    time.sleep(args.down_s)
                    # The strip went on meanwhile: the camera comes back where its neighbours are.
                    other = next(c for c in ids if c != args.kill)
                    now_line = control(endpoints[other]["control"], {"cmd": "coil"})["camera_line"]
                    first = (now_line // 128) * 128
                    procs[args.kill] = daemon(args.kill, cams[ids.index(args.kill)], first)
                    killed = True
            with CoilRecords(path=Path(coil["db"]["path"]), synchronous="NORMAL") as records:
                rec = records.coil(COIL)
                if rec is not None and rec.state == "closed" and (work / "reports").exists():
                    closed = rec
                    break
        if closed is None:
            raise RuntimeError(f"the coil did not close within {args.timeout_s} s; logs in {logs}")
        wall = time.monotonic() - t0
        time.sleep(1.0)  # the report is written right after the record closes
    finally:
        stop_all(procs.values())

    # --- what was planted, what the record holds --------------------------------------------
    truth = []
    for side in ("top", "bottom"):
        cam = next(c for c in cams if c.side == side)
        src = SourceConfig(
            strip_width=args.strip_width,
            defects_per_100_frames=args.defects_per_100_frames,
            roll_period_lines=cam.roll_period_lines if side == "top" else None,
        )
        prints = planted_on_strip(src, seed=cam.seed, frame_lines=args.frame_lines, first_line=head, end_line=tail)
        strip = SyntheticStrip(width=args.strip_width, seed=cam.seed)
        truth += to_coil(
            prints, strip=strip, head_line=head, mm_per_line=mm_line, mm_per_px=mm_px, strip_left_px=left, side=side
        )
    with CoilRecords(path=Path(coil["db"]["path"]), synchronous="NORMAL") as records:
        defects = records.defects(COIL)
        stretches = records.uninspected(COIL)
        rec = records.coil(COIL)
    assert rec is not None
    visible = [t for t in truth if not in_uninspected(t, stretches, spans)]
    found, used = match(visible, defects)
    sources = {s for d in defects for s in d.sources}
    published = []
    for cid in ids:
        with sqlite3.connect(work / f"journal_{cid}.sqlite") as conn:
            for seq, header in conn.execute("SELECT seq, header FROM alerts"):
                if json.loads(header).get("coil_id") == COIL:
                    published.append(f"{cid}:{seq}")
    lost = [s for s in published if s not in sources]
    roll = roll_for_side(cfg0.coil.rolls, "top")
    period_lines = next(c.roll_period_lines for c in cams if c.side == "top")
    report = work / "reports" / COIL
    confirmed = [f for f in rec.families if f.confirmed]
    grading = rec.grading
    return {
        "cameras": len(cams),
        "camera_ids": ids,
        "length_m": (tail - head) * mm_line / 1000,
        "line_rate_hz": args.line_rate,
        "planted": len(visible),
        "planted_uninspected": len(truth) - len(visible),
        "found": len(found),
        "recall": len(found) / max(1, len(visible)),
        "false_alerts": len(defects) - len(used),
        "record_defects": len(defects),
        "missed": [asdict(t) for i, t in enumerate(visible) if i not in found][:20],
        "false": [
            {"md_m": d.md_m, "cd_mm": d.cd_mm, "side": d.side, "cameras": d.cameras, "area_mm2": d.area_mm2}
            for j, d in enumerate(defects)
            if j not in used
        ][:20],
        "published_alerts": len(published),
        "lost_alerts": len(lost),
        "lost": lost[:20],
        "uninspected_m": sum(u.md_to_m - u.md_from_m for u in stretches),
        "uninspected": [asdict(u) for u in stretches],
        "periodic_planted_m": period_lines * mm_line / 1000 if period_lines else None,
        "periodic_found_m": [f.period_m for f in confirmed],
        "roll_planted": roll.name,
        "roll_found": [f.roll for f in confirmed],
        "disposition": None if grading is None else grading.disposition,
        "report_pdf": str(report / "report.pdf"),
        "report_png": str(report / "map.png"),
        "report_json": str(report / "report.json"),
        "killed": args.kill,
        "wall_s": wall,
        "fit_s": fit_s,
        "threshold": threshold,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/coil_line"), help="bundle, journals, records, logs")
    ap.add_argument("--length-m", type=float, default=300.0, help="coil length")
    ap.add_argument("--cameras-per-side", type=int, default=2)
    ap.add_argument("--strip-width", type=int, default=480, help="strip pixels across (all cameras of a side)")
    ap.add_argument("--overlap-px", type=int, default=32, help="columns neighbouring cameras share")
    ap.add_argument("--mm-per-px", type=float, default=2.84, help="CD resolution (1250 mm over ~440 px)")
    ap.add_argument("--mm-per-line", type=float, default=2.0, help="MD resolution")
    ap.add_argument("--frame-lines", type=int, default=1024)
    ap.add_argument("--overlap-lines", type=int, default=384)
    ap.add_argument("--line-rate", type=float, default=1000.0, help="lines per second per camera (wall clock)")
    ap.add_argument("--defects-per-100-frames", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--kill", default=None, help="camera to SIGKILL mid-coil and start again, e.g. cam1")
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of the coil at which to kill it")
    ap.add_argument("--down-s", type=float, default=3.0, help="seconds the killed camera stays down")
    ap.add_argument("--timeout-s", type=float, default=900.0)
    return ap


def main() -> None:
    args = parser().parse_args()
    out = run(args)
    print(f"\n`python benchmarks/coil_line.py {' '.join(sys.argv[1:])}`\n")
    print("| | value |\n|---|---|")
    for k in (
        "cameras",
        "length_m",
        "planted",
        "found",
        "recall",
        "false_alerts",
        "lost_alerts",
        "planted_uninspected",
        "uninspected_m",
        "periodic_planted_m",
        "periodic_found_m",
        "roll_planted",
        "roll_found",
        "disposition",
        "wall_s",
    ):
        print(f"| {k} | {out[k]} |")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
