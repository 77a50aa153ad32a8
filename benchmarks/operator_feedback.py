"""The operator teaches the running model: false alarms and defect classes (issue 18).

    python benchmarks/operator_feedback.py --json runs/operator_feedback.json

A ``stripinspect run`` daemon on a synthetic strip paced by the wall clock, with defects of
every kind the synthetic strip draws planted (scratch, pit, scale, hole, edge crack, dent) and
a benign ink stamp printed every ``--stamp-period`` lines that the model was not fitted on (so
it raises false alarms). Strip stretches of ``--phase-lines`` each:

- A: the operator's stretch. Once the daemon has inspected A and then C, 5 of A's stamp false
  alarms are marked "false alarm" and 5 of A's alerts of each defect kind are labelled with
  their kind, through the functions the operator station calls (pipeline/transport/feedback.py),
  while the daemon runs on. It goes on inspecting B with what it was taught (the live check).
- C: the measured stretch, inspected twice: by the daemon before any feedback, and, after it, by
  the daemon started again over C (``source.resume_line``; it opens the overlay its bundle now
  has). Same strip, same defects: before and after are paired, so a change is the model's, not
  the strip's. The operator never saw C.

Alerts are matched to what was planted by position (ground truth from the source's own plan).
JSON keys: false_alarms_before, false_alarms_after (alerts on no planted defect in C: equal
length of strip), recall_before, recall_after (planted defects in C with an alert),
feedback_apply_s (the slowest false-alarm request, sent to answered: the model has the rows by
then and scores the next frame with them), few_shot {classes, shots, accuracy, per_class,
unknown, confusions} (alerts on C's planted defects after), plus live_after (B), phases,
stamp alerts, planted counts, refused.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from coil_line import calibrate_threshold, fit_bundle_for, free_port, stop_all  # noqa: E402
from plc_latency import start, wait_port  # noqa: E402

from pipeline.acquisition.sources import defect_plan  # noqa: E402
from pipeline.acquisition.synthetic import PlantedDefect, SyntheticStrip, occurrences  # noqa: E402
from pipeline.acquisition.synthetic_coil import CoilCamera  # noqa: E402
from pipeline.config import SourceConfig  # noqa: E402

MATCH_PX = 12  # an alert's box within this of a print's box is on that print
USER = "bench-operator"


def list_overlay_file(bundle: Path) -> dict[str, Any]:
    """What the overlay beside ``bundle`` holds, from its index file: version, rows, entries."""
    doc = json.loads((bundle.parent / f"{bundle.name}.overlay" / "overlay.json").read_text(encoding="utf-8"))
    entries = doc["entries"]
    return {
        "version": doc["version"],
        "normal_rows": sum(e["rows"] for e in entries if e["kind"] == "normal" and e["removed_time"] is None),
        "entries": Counter(e["kind"] for e in entries),
    }


class AlertLog:
    """Every alert of the daemon's PUB, on a thread (journal-backed: none missed)."""

    def __init__(self, *, pub: str, control: str) -> None:
        import zmq

        from pipeline.transport.listen import listen

        self.alerts: list[dict[str, Any]] = []
        self.camera_line = 0
        self.taught_at = 0  # the camera's line when the operator had given the feedback
        self._stop = threading.Event()
        self._ctx = zmq.Context()

        def on_message(topic: str, h: dict[str, Any]) -> None:
            if topic == "alert":
                self.alerts.append(h)
            elif topic == "heartbeat":
                self.camera_line = int((h.get("coil") or {}).get("camera_line") or 0)

        self._t = threading.Thread(
            target=lambda: listen(
                endpoint=pub,
                topics=("alert", "heartbeat"),
                on_message=on_message,
                stop=self._stop.is_set,
                context=self._ctx,
                until_state=None,
                control_endpoint=control,
                since=0,
            ),
            daemon=True,
        )
        self._t.start()

    def wait_line(self, line: int, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while self.camera_line < line:
            if time.monotonic() > end:
                raise TimeoutError(f"the camera did not reach line {line} within {timeout_s} s (at {self.camera_line})")
            time.sleep(0.2)

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self._ctx.term()


class Truth:
    """What the source planted, as footprints (strip pixels), and the stamp's prints."""

    def __init__(self, *, cfg: SourceConfig, seed: int, width: int, frame_lines: int, upto: int) -> None:
        plan = defect_plan(cfg, seed=seed, strip_width=width, frame_lines=frame_lines)
        self.strip = SyntheticStrip(width=width, seed=seed)
        self.defects = [(d, self.strip.footprint(d)) for d in plan.plan(upto)]
        stamp = plan.benign
        assert stamp is not None
        self.stamps = [
            (d, self.strip.footprint(d))
            for d in (
                PlantedDefect(**{**stamp.__dict__, "line": ln, "period": 0}) for ln in occurrences(stamp, 0, upto)
            )
        ]

    @staticmethod
    def _on(h: dict[str, Any], fp: Any) -> bool:
        """The alert's box (centred on its centroid line; columns as in the frame, the camera
        being the whole strip) comes within MATCH_PX of the print's box: a defect a frame border
        cut in two is found by both halves (as coil_line matches in coil coordinates)."""
        x, _, w, bh = h["box"]
        line = float(h["line"])
        md_gap = max(fp.first_line - (line + bh / 2), (line - bh / 2) - (fp.first_line + fp.lines))
        cd_gap = max(fp.first_col - (x + w), x - (fp.first_col + fp.cols))
        return md_gap <= MATCH_PX and cd_gap <= MATCH_PX

    def match(self, h: dict[str, Any]) -> tuple[str, PlantedDefect | None]:
        """("defect", d), ("stamp", print) or ("false", None)."""
        for d, fp in self.defects:
            if self._on(h, fp):
                return "defect", d
        for d, fp in self.stamps:
            if self._on(h, fp):
                return "stamp", d
        return "false", None

    def planted_in(self, a: int, b: int) -> list[PlantedDefect]:
        return [d for d, fp in self.defects if a <= fp.first_line and fp.first_line + fp.lines <= b]


def phase(log: list[dict[str, Any]], truth: Truth, a: int, b: int) -> dict[str, Any]:
    """Alerts whose centroid lies in strip lines [a, b), against what was planted there."""
    alerts = [h for h in log if a <= float(h["line"]) < b]
    kinds = [truth.match(h) for h in alerts]
    planted = truth.planted_in(a, b)
    hit = {id(d) for k, d in kinds if k == "defect"}
    return {
        "alerts": alerts,
        "matches": kinds,
        "false_alarms": sum(1 for k, _ in kinds if k != "defect"),
        "stamp_alerts": sum(1 for k, _ in kinds if k == "stamp"),
        "planted": len(planted),
        "recall": sum(1 for d in planted if id(d) in hit) / max(1, len(planted)),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import zmq

    from pipeline.transport.feedback import label_defect, mark_false_alarm

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for old in [*work.glob("*.sqlite*")]:
        old.unlink()
    cam = CoilCamera(side="top", seed=args.seed, strip_x0=0, width=args.width, cd_offset_mm=0.0, roll_period_lines=None)
    bundle = fit_bundle_for(work, [cam], frame_lines=args.frame_lines, strip_width=args.width)
    threshold = calibrate_threshold(bundle, [cam], frame_lines=args.frame_lines, strip_width=args.width)
    overlay = bundle.parent / f"{bundle.name}.overlay"
    if overlay.exists():
        import shutil

        shutil.rmtree(overlay)  # a fresh model: nothing taught yet
    src = {
        "kind": "synthetic",
        "block_lines": 128,
        "line_rate_hz": args.line_rate,
        "defects_per_100_frames": args.defects_per_100_frames,
        "roll_period_lines": None,
        "benign_period_lines": args.stamp_period,
    }
    ports = {k: free_port() for k in ("pub", "control")}
    cfg = {
        "synthetic": {"width": args.width, "seed": args.seed},
        "runtime": {"onnx_threads": 1, "faiss_threads": 1},
        "daemon": {
            "bundle": str(bundle),
            "camera_id": "cam0",
            "strip_edge_px": 0.0,
            "frame_lines": args.frame_lines,
            "overlap_lines": args.overlap_lines,
            "mm_per_px": 1.0,
            "mm_per_line": 1.0,
            "threshold": threshold,
            "min_area_px": 8,
            "thumbnail_px": 0,
            "heartbeat_s": 0.25,
            "metrics_port": None,
            "pub_endpoint": f"tcp://127.0.0.1:{ports['pub']}",
            "control_endpoint": f"tcp://127.0.0.1:{ports['control']}",
            "journal": {"path": str(work / "journal.sqlite"), "synchronous": "NORMAL"},
            **({"feedback": {"max_score_ratio": args.max_score_ratio}} if args.max_score_ratio is not None else {}),
            "source": src,
        },
    }
    cfg_path = work / "feedback.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    n = args.phase_lines
    a0 = args.warmup_lines
    total = a0 + 4 * n + args.gap_lines + 8 * args.frame_lines  # A, C, B and room for the feedback
    truth = Truth(
        cfg=SourceConfig(**{k: v for k, v in src.items() if k != "kind"}),
        seed=args.seed,
        width=args.width,
        frame_lines=args.frame_lines,
        upto=total + 4 * args.frame_lines,
    )
    control = f"tcp://127.0.0.1:{ports['control']}"
    pub = f"tcp://127.0.0.1:{ports['pub']}"
    a_rng, c_rng = (a0, a0 + n), (a0 + n, a0 + 2 * n)
    ctx = zmq.Context()
    refused: list[str] = []
    apply_s: list[float] = []
    classes: list[str] = []
    stamps: list[dict[str, Any]] = []

    def inspect(name: str, config: Path, until: Any, then: Any = None) -> AlertLog:
        """Run a daemon on ``config`` until its camera passes ``until(log)``; ``then(log)`` first."""
        daemon = start(["run", "--config", str(config), "--quiet"], logs / f"{name}.log")
        log: AlertLog | None = None
        try:
            wait_port(ports["control"], daemon, logs / f"{name}.log")
            log = AlertLog(pub=pub, control=control)
            if then is not None:
                then(log)
            log.wait_line(until(log), args.timeout_s)
            return log
        finally:
            if log is not None:
                log.close()
            stop_all([daemon], timeout_s=30.0)

    def operator(log: AlertLog) -> None:
        """Once A and C are inspected: mark, label, and let the daemon run on over B."""
        log.wait_line(c_rng[1] + args.frame_lines, args.timeout_s)
        seen = phase(log.alerts, truth, *a_rng)
        stamps.extend(h for h, (k, _) in zip(seen["alerts"], seen["matches"], strict=True) if k == "stamp")
        for h in stamps[: args.shots]:
            t0 = time.perf_counter()
            r = mark_false_alarm(ctx, control, journal=h["journal"], seq=h["seq"], user=USER)
            apply_s.append(time.perf_counter() - t0)
            if not r["ok"]:
                refused.append(r["error"])
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for h, (k, d) in zip(seen["alerts"], seen["matches"], strict=True):
            if k == "defect" and d is not None:
                by_kind.setdefault(d.kind, []).append(h)
        classes.extend(sorted(kind for kind, hs in by_kind.items() if len(hs) >= args.shots))
        for kind in classes:
            for h in by_kind[kind][: args.shots]:
                r = label_defect(ctx, control, journal=h["journal"], seq=h["seq"], label=kind, user=USER)
                if not r["ok"]:
                    refused.append(r["error"])
        log.taught_at = log.camera_line

    try:
        live = inspect(
            "daemon-live", cfg_path, lambda log: log.taught_at + args.gap_lines + n + args.frame_lines, operator
        )
        b0 = live.taught_at + args.gap_lines
        b_rng = (b0, b0 + n)
        before = phase(live.alerts, truth, *c_rng)
        a_phase = phase(live.alerts, truth, *a_rng)
        b_phase = phase(live.alerts, truth, *b_rng)
        # The same stretch C once more, by the daemon with what it was taught (its overlay).
        cfg["daemon"]["source"]["resume_line"] = c_rng[0] - 2 * args.frame_lines
        cfg["daemon"]["journal"]["path"] = str(work / "journal_replay.sqlite")
        replay_cfg = work / "feedback_replay.yaml"
        replay_cfg.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        replay = inspect("daemon-replay", replay_cfg, lambda _log: c_rng[1] + args.frame_lines)
        after = phase(replay.alerts, truth, *c_rng)
        overlay_state = list_overlay_file(bundle)
    finally:
        ctx.term()

    # --- few-shot: the class of every alert on a planted defect of a labelled kind, after --------
    scored = [
        (d.kind, h.get("class", "unknown"))
        for h, (k, d) in zip(after["alerts"], after["matches"], strict=True)
        if k == "defect" and d is not None and d.kind in classes
    ]
    per_class = {
        c: sum(1 for t, p in scored if t == c and p == c) / max(1, sum(1 for t, _ in scored if t == c)) for c in classes
    }
    confusion = Counter(f"{t}->{p}" for t, p in scored if t != p)
    return {
        "false_alarms_before": before["false_alarms"],
        "false_alarms_after": after["false_alarms"],
        "recall_before": before["recall"],
        "recall_after": after["recall"],
        "feedback_apply_s": max(apply_s) if apply_s else None,
        "few_shot": {
            "classes": classes,
            "shots": args.shots,
            "accuracy": sum(1 for t, p in scored if t == p) / max(1, len(scored)),
            "scored": len(scored),
            "per_class": per_class,
            "unknown": sum(1 for _, p in scored if p == "unknown"),
            "confusions": dict(confusion.most_common(8)),
        },
        "phase_lines": n,
        "phases": {"operator_A": list(a_rng), "measured_C": list(c_rng), "live_after_B": list(b_rng)},
        "stamp_alerts_before": before["stamp_alerts"],
        "stamp_alerts_after": after["stamp_alerts"],
        "planted_C": before["planted"],
        "live_after": {
            "false_alarms_A": a_phase["false_alarms"],
            "stamp_alerts_A": a_phase["stamp_alerts"],
            "false_alarms_B": b_phase["false_alarms"],
            "stamp_alerts_B": b_phase["stamp_alerts"],
            "recall_A": a_phase["recall"],
            "recall_B": b_phase["recall"],
        },
        "false_alarms_marked": min(len(stamps), args.shots),
        "refused": refused,
        "overlay": overlay_state,
        "threshold": threshold,
        "line_rate_hz": args.line_rate,
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--work", type=Path, default=Path("/tmp/operator_feedback"), help="bundle, journal, logs")
    ap.add_argument("--width", type=int, default=256, help="camera pixels across")
    ap.add_argument("--frame-lines", type=int, default=512)
    ap.add_argument("--overlap-lines", type=int, default=128)
    ap.add_argument("--line-rate", type=float, default=1500.0, help="lines per second (wall clock)")
    ap.add_argument("--defects-per-100-frames", type=float, default=150.0)
    ap.add_argument("--stamp-period", type=int, default=1100, help="lines between the benign stamp's prints")
    ap.add_argument("--phase-lines", type=int, default=24_576, help="strip lines per phase (before, after)")
    ap.add_argument("--warmup-lines", type=int, default=1024, help="strip before the first phase")
    ap.add_argument("--gap-lines", type=int, default=1024, help="strip between the feedback and the second phase")
    ap.add_argument("--shots", type=int, default=5, help="false alarms marked; examples labelled per kind")
    ap.add_argument(
        "--max-score-ratio", type=float, default=None, help="daemon.feedback.max_score_ratio (default: the config's)"
    )
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--timeout-s", type=float, default=600.0)
    return ap


def main() -> None:
    args = parser().parse_args()
    out = run(args)
    print(f"\n`python benchmarks/operator_feedback.py {' '.join(sys.argv[1:])}`\n")
    print("| stretch C | before | after |\n|---|---|---|")
    print(f"| false alarms ({out['phase_lines']} lines) | {out['false_alarms_before']} | {out['false_alarms_after']} |")
    print(f"| of them on the stamp | {out['stamp_alerts_before']} | {out['stamp_alerts_after']} |")
    print(f"| recall | {out['recall_before']:.3f} | {out['recall_after']:.3f} |")
    print(f"| planted defects | {out['planted_C']} | {out['planted_C']} |")
    print(f"\nlive (the daemon that was taught, A then B): {out['live_after']}")
    fs = out["few_shot"]
    print(
        f"\nfeedback_apply_s {out['feedback_apply_s']}; few-shot {fs['classes']} x {fs['shots']}: accuracy "
        f"{fs['accuracy']:.3f} over {fs['scored']} ({fs['unknown']} unknown); refused: {out['refused']}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
