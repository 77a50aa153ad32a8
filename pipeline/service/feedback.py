"""Operator feedback in the running daemon: what recent alerts looked like to the model, and
the overlay of the model in force (pipeline/inference/overlay.py).

The score stage hands every defect's region features over (``regions``); the publish stage,
once the alert has its number, keeps them (``remember``, the last ``keep_alerts``). The control
thread then serves the operator: ``false_alarm`` adds a kept region's patches to the bank
(applied from the next frame: the scorer's extra index is swapped whole), ``label`` stores its
pooled vector as an example of a class, ``overlay`` lists, ``undo`` takes an entry back. The
score stage classifies each new defect against the examples (``classify``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import FeedbackConfig
from pipeline.inference.overlay import Overlay, OverlayEntry, OverlayError, check_label, classify, region_rows
from pipeline.transport.messages import Defect

log = logging.getLogger("stripinspect.feedback")
KNOWN_CLASS_CONFIDENCE = 0.5  # a false alarm this like a labelled defect class is refused


@dataclass(frozen=True)
class Region:
    """A defect as the model saw it: the patch features of its box grown by the margin (float16
    to halve what is kept), its pooled box vector (float32 (1, D)), its score and threshold, and
    the overlay of the model that scored it."""

    rows: np.ndarray | None  # None: larger than the overlay's cap (a false alarm on it is refused)
    pooled: np.ndarray
    max_score: float
    threshold: float
    overlay: Overlay | None


def _taught(ov: Overlay, alert: dict[str, Any], kind: str, label: str | None) -> OverlayEntry | None:
    """The active entry already made from this alert (a request repeated after a timeout whose
    first try did reach the daemon): answered with it, not added twice."""
    for e in ov.entries:
        if e.active and e.kind == kind and e.alert == alert and e.label == label:
            return e
    return None


class Teacher:
    """Thread-safe: the score, publish and control threads call it."""

    def __init__(self, *, cfg: FeedbackConfig, camera_id: str) -> None:
        self.cfg, self.camera_id = cfg, camera_id
        self._lock = threading.Lock()
        self._kept: OrderedDict[tuple[str | None, int], Region] = OrderedDict()
        self._snapshot: tuple[int, int, np.ndarray, list[str]] | None = None  # id(overlay), version, examples

    # --- the score stage ----------------------------------------------------------------------

    def regions(
        self, features: Any, defects: list[Defect], *, stride: int, overlay: Overlay | None, band: Any, first_row: int
    ) -> list[Region]:
        """Each defect's region from the frame's PatchCore features (h, w, D) and its band's
        patch scores (rows, w) from ``first_row``; none for the learned-encoder bundles (feedback
        needs a PatchCore bank)."""
        if overlay is None or not isinstance(features, np.ndarray) or features.ndim != 3:
            return []
        scores = band if isinstance(band, np.ndarray) and band.ndim == 2 else None
        out = []
        for d in defects:
            rows, pooled = region_rows(
                features, d.box, stride=stride, margin_px=self.cfg.margin_px, patch_scores=scores, first_row=first_row
            )
            # A region bigger than the whole cap could never be added: not kept (a full-width
            # band would hold tens of MB of features for nothing).
            kept = rows.astype(np.float16) if rows.shape[0] <= self.cfg.max_rows else None
            out.append(Region(kept, pooled, d.max_score, d.threshold, overlay))
        return out

    def classify(self, region: Region) -> tuple[str, float | None]:
        """The class of a new defect from the labelled examples of its model's overlay."""
        ov = region.overlay
        if ov is None:
            return "unknown", None
        with self._lock:
            snap = self._snapshot
            if snap is None or snap[0] != id(ov) or snap[1] != ov.version:
                examples, labels = ov.examples()
                snap = self._snapshot = (id(ov), ov.version, examples, labels)
        return classify(
            region.pooled[0],
            snap[2],
            snap[3],
            max_distance=self.cfg.class_distance,
            neighbours=self.cfg.class_neighbours,
        )

    # --- the publish stage --------------------------------------------------------------------

    def remember(self, journal: str | None, seq: int, region: Region) -> None:
        with self._lock:
            self._kept[(journal, seq)] = region
            while len(self._kept) > self.cfg.keep_alerts:
                self._kept.popitem(last=False)

    # --- the control thread -------------------------------------------------------------------

    def _region(self, req: dict[str, Any]) -> tuple[tuple[str | None, int], Region]:
        seq, journal = req.get("seq"), req.get("journal")
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise OverlayError(f"seq must be an alert's number, got {seq!r}")
        with self._lock:
            region = self._kept.get((journal, seq))
        if region is None:
            raise OverlayError(
                f"alert {seq} of journal {journal!r} is not among the last {self.cfg.keep_alerts} alerts this "
                "daemon kept (daemon.feedback.keep_alerts), or it came from another camera"
            )
        if region.overlay is None:
            raise OverlayError("feedback needs a PatchCore bundle (the learned-encoder bundles have no patch bank)")
        return (journal, seq), region

    @staticmethod
    def _user(req: dict[str, Any]) -> str:
        user = req.get("user")
        if not isinstance(user, str) or not user.strip() or len(user) > 128:
            raise OverlayError(f"user must name who gives the feedback, got {user!r}")
        return user.strip()

    def false_alarm(self, req: dict[str, Any], *, scorer: Any) -> dict[str, Any]:
        """The region of alert (journal, seq) joins the bank of ``scorer``'s model."""
        t0 = time.perf_counter()
        try:
            (journal, seq), region = self._region(req)
            user = self._user(req)
            limit = self.cfg.max_score_ratio * region.threshold
            if region.max_score > limit:
                raise OverlayError(
                    f"alert {seq} scored {region.max_score:.3g}, {region.max_score / region.threshold:.1f}x its "
                    f"threshold (limit {self.cfg.max_score_ratio}x, daemon.feedback.max_score_ratio): a real "
                    "defect, not a false alarm; refused"
                )
            known, confidence = self.classify(region)
            if known != "unknown" and (confidence or 0.0) >= KNOWN_CLASS_CONFIDENCE:
                # A score rule cannot tell a strong benign mark from a real defect; the examples
                # operators labelled can: what looks like one of them is no false alarm.
                raise OverlayError(
                    f"alert {seq} looks like the labelled class {known!r} (confidence {confidence:.2f}): a defect, "
                    "not a false alarm; refused (undo that class's examples if they were wrong)"
                )
            if region.rows is None:
                raise OverlayError(
                    f"alert {seq}'s region is larger than the overlay's cap of {self.cfg.max_rows} rows "
                    "(daemon.feedback.max_rows): refused"
                )
            ov = region.overlay
            assert ov is not None
            alert = {"camera_id": self.camera_id, "journal": journal, "seq": seq}
            with self._lock:
                entry = _taught(ov, alert, "normal", None) or ov.add(
                    kind="normal", rows=region.rows.astype(np.float32), user=user, alert=alert
                )
                rows = ov.normal_rows()
            if getattr(scorer, "overlay", None) is ov:
                scorer.set_extra(rows)
        except OverlayError as err:
            log.warning("feedback refused: %s", err)
            return {"ok": False, "error": str(err)}
        apply_s = time.perf_counter() - t0
        log.info("false alarm %s/%s by %s: %d normal rows added (%.3f s)", journal, seq, user, entry.rows, apply_s)
        return {"ok": True, "entry": entry.to_json(), "apply_s": apply_s}

    def label(self, req: dict[str, Any]) -> dict[str, Any]:
        try:
            (journal, seq), region = self._region(req)
            user = self._user(req)
            ov = region.overlay
            assert ov is not None
            alert = {"camera_id": self.camera_id, "journal": journal, "seq": seq}
            with self._lock:
                label = check_label(req.get("class"))
                entry = _taught(ov, alert, "label", label) or ov.add(
                    kind="label", rows=region.pooled, user=user, alert=alert, label=label
                )
        except OverlayError as err:
            log.warning("label refused: %s", err)
            return {"ok": False, "error": str(err)}
        log.info("alert %s/%s labelled %r by %s", journal, seq, entry.label, user)
        return {"ok": True, "entry": entry.to_json()}

    def describe(self, overlay: Overlay | None) -> dict[str, Any]:
        if overlay is None:
            return {"ok": False, "error": "feedback needs a PatchCore bundle (no overlay for this model)"}
        with self._lock:
            return {"ok": True, **overlay.describe()}

    def undo(self, req: dict[str, Any], *, scorer: Any) -> dict[str, Any]:
        ov = getattr(scorer, "overlay", None)
        if ov is None:
            return {"ok": False, "error": "feedback needs a PatchCore bundle (no overlay for this model)"}
        try:
            user = self._user(req)
            with self._lock:
                gone = ov.remove(req.get("id"), user=user)
                rows = ov.normal_rows()
            scorer.set_extra(rows)
        except OverlayError as err:
            return {"ok": False, "error": str(err)}
        log.info("overlay entry %d removed by %s", gone.id, user)
        return {"ok": True, "removed": gone.to_json()}
