"""What operators taught a running model, kept beside its bundle: the overlay.

Two kinds of entries, each one file of float32 rows plus a line in ``overlay.json``:

- ``normal``: the patch features of a region an operator called a false alarm. They join the
  memory bank (PatchCore's nearest-neighbour distance falls to ~0 for that pattern), so the same
  normal pattern stops alerting.
- ``label``: a defect's pooled region features with the class an operator gave it; alerts are
  classified by their nearest labelled examples (few-shot, cosine distance).

The bundle itself is never changed (its hashes stay valid); the overlay lives in
``<bundle>.overlay/``. ``overlay.json`` is versioned (every change +1) and names each entry's
file with its sha256; loading checks them, and a broken overlay is refused with one line.
Entries are never deleted: an undo marks the entry removed, by whom and when, so the list says
who taught the model what, and when it was taken back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.errors import StripinspectError

SCHEMA = 1
INDEX_FILE = "overlay.json"
LABEL_RE_MAX = 64

EntryKind = Literal["normal", "label"]


class OverlayError(StripinspectError):
    """The overlay cannot be read, written or changed as asked; one line."""


@dataclass(frozen=True)
class OverlayEntry:
    """One thing an operator taught: ``rows`` float32 rows in ``file`` (sha256 ``sha256``)."""

    id: int
    kind: EntryKind
    user: str
    time: float
    alert: dict[str, Any]  # camera_id, journal, seq of the alert it came from
    rows: int
    label: str | None
    file: str
    sha256: str
    removed_by: str | None = None
    removed_time: float | None = None

    @property
    def active(self) -> bool:
        return self.removed_time is None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["class"] = out.pop("label")
        return out


def overlay_dir(bundle: Path) -> Path:
    """Where a bundle's overlay lives: beside it, never inside (the bundle's hashes stay valid)."""
    bundle = Path(bundle)
    return bundle.parent / f"{bundle.name}.overlay"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_label(label: object) -> str:
    if not isinstance(label, str) or not label.strip() or len(label.strip()) > LABEL_RE_MAX:
        raise OverlayError(f"class must be a name of 1 to {LABEL_RE_MAX} characters, got {label!r}")
    name = label.strip()
    if name == "unknown" or any(c in name for c in "\n\r\t/\\"):
        raise OverlayError(f"class {name!r} is reserved or has a control character or slash")
    return name


class Overlay:
    """The overlay of one bundle (embedding ``dim``), at most ``max_rows`` normal rows active.

    Not thread-safe: the daemon's feedback object serialises changes."""

    def __init__(self, *, folder: Path, dim: int, max_rows: int) -> None:
        if dim < 1 or max_rows < 0:
            raise OverlayError(f"dim must be >= 1 and max_rows >= 0, got {dim}, {max_rows}")
        self.folder, self.dim, self.max_rows = Path(folder), dim, max_rows
        self.version = 0
        self.entries: list[OverlayEntry] = []
        self._rows: dict[int, np.ndarray] = {}
        if (self.folder / INDEX_FILE).exists():
            self._load()

    # --- reading ---------------------------------------------------------------------------

    def _load(self) -> None:
        path = self.folder / INDEX_FILE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            if doc.get("schema") != SCHEMA:
                raise OverlayError(f"{path}: schema {doc.get('schema')!r}, this version reads {SCHEMA}")
            if doc.get("dim") != self.dim:
                raise OverlayError(f"{path}: rows of dim {doc.get('dim')}, the bundle embeds {self.dim}")
            entries = [
                OverlayEntry(**{k: v for k, v in e.items() if k != "class"}, label=e["class"]) for e in doc["entries"]
            ]
            version = int(doc["version"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OverlayError(f"{path}: unreadable overlay: {err}") from None
        rows: dict[int, np.ndarray] = {}
        for e in entries:
            f = self.folder / e.file
            if not f.is_file():
                raise OverlayError(f"{path}: entry {e.id}'s file {e.file} is missing")
            if _sha256(f) != e.sha256:
                raise OverlayError(f"{path}: entry {e.id}'s file {e.file} does not match its sha256")
            try:
                a = np.load(f, allow_pickle=False)
            except (OSError, ValueError) as err:
                raise OverlayError(f"{f}: unreadable rows: {err}") from None
            if a.dtype != np.float32 or a.ndim != 2 or a.shape != (e.rows, self.dim) or not np.isfinite(a).all():
                raise OverlayError(f"{f}: rows {a.dtype} {a.shape}, expected float32 ({e.rows}, {self.dim}), finite")
            rows[e.id] = a
        self.entries, self._rows, self.version = entries, rows, version

    def _disk_version(self) -> int:
        """The version ``overlay.json`` holds now (0 when there is none yet)."""
        path = self.folder / INDEX_FILE
        if not path.exists():
            return 0
        try:
            return int(json.loads(path.read_text(encoding="utf-8"))["version"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise OverlayError(f"{path}: unreadable overlay: {err}") from None

    def normal_rows(self) -> np.ndarray:
        """Every active false-alarm row, float32 (n, dim) (n may be 0)."""
        parts = [self._rows[e.id] for e in self.entries if e.active and e.kind == "normal"]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def examples(self) -> tuple[np.ndarray, list[str]]:
        """Active labelled examples: pooled vectors float32 (m, dim) and their classes."""
        act = [e for e in self.entries if e.active and e.kind == "label"]
        if not act:
            return np.zeros((0, self.dim), np.float32), []
        return np.concatenate([self._rows[e.id] for e in act]), [str(e.label) for e in act]

    @property
    def active_rows(self) -> int:
        return sum(e.rows for e in self.entries if e.active and e.kind == "normal")

    def describe(self) -> dict[str, Any]:
        path = self.folder / INDEX_FILE
        classes: dict[str, int] = {}
        for e in self.entries:
            if e.active and e.kind == "label":
                classes[str(e.label)] = classes.get(str(e.label), 0) + 1
        return {
            "version": self.version,
            "sha256": _sha256(path) if path.exists() else None,
            "folder": str(self.folder),
            "rows": self.active_rows,
            "cap_rows": self.max_rows,
            "entries": [e.to_json() for e in self.entries],
            "classes": classes,
        }

    # --- changing ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """Hold the folder's lock and start from what is on disk: cameras that share a bundle
        share its overlay, and another daemon may have changed it since this one read it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = (self.folder / ".lock").open("a")
        except OSError as err:
            raise OverlayError(f"cannot write overlay {self.folder}: {err}") from None
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            if self._disk_version() != self.version:
                self._load()  # another daemon changed it: every file read and checked again
            yield

    def add(
        self, *, kind: EntryKind, rows: np.ndarray, user: str, alert: dict[str, Any], label: str | None = None
    ) -> OverlayEntry:
        """Write ``rows`` as a new entry and commit the index; OverlayError when over the cap."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim or rows.shape[0] == 0 or not np.isfinite(rows).all():
            raise OverlayError(f"rows must be finite float32 (n >= 1, {self.dim}), got {rows.shape}")
        with self._changing():
            return self._add(kind=kind, rows=rows, user=user, alert=alert, label=label)

    def _add(
        self, *, kind: EntryKind, rows: np.ndarray, user: str, alert: dict[str, Any], label: str | None
    ) -> OverlayEntry:
        if kind == "normal" and self.active_rows + rows.shape[0] > self.max_rows:
            raise OverlayError(
                f"the overlay holds {self.active_rows} of {self.max_rows} normal rows; {rows.shape[0]} more would "
                "pass the cap (daemon.feedback.max_rows): undo old entries or refit"
            )
        if kind == "label":
            label = check_label(label)
        if not isinstance(user, str) or not user:
            raise OverlayError("every change names its user")
        new_id = max((e.id for e in self.entries), default=0) + 1
        # A random part: a file is never overwritten, whoever writes the folder.
        name = f"{new_id:06d}_{kind}_{secrets.token_hex(4)}.npy"
        tmp = self.folder / f".{name}.tmp"
        try:
            with tmp.open("wb") as fh:
                np.save(fh, rows, allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / name)
        except OSError as err:
            raise OverlayError(f"cannot write overlay {self.folder}: {err}") from None
        entry = OverlayEntry(
            id=new_id,
            kind=kind,
            user=user,
            time=time.time(),
            alert=dict(alert),
            rows=int(rows.shape[0]),
            label=label,
            file=name,
            sha256=_sha256(self.folder / name),
        )
        self._commit([*self.entries, entry])
        self._rows[new_id] = rows
        return entry

    def remove(self, entry_id: object, *, user: str) -> OverlayEntry:
        """Mark entry ``entry_id`` removed (its rows stop counting from now)."""
        with self._changing():
            return self._remove(entry_id, user=user)

    def _remove(self, entry_id: object, *, user: str) -> OverlayEntry:
        match = [e for e in self.entries if e.id == entry_id and not isinstance(entry_id, bool)]
        if not match:
            raise OverlayError(f"no overlay entry {entry_id!r}")
        if not match[0].active:
            raise OverlayError(f"overlay entry {entry_id} was removed already")
        gone = replace(match[0], removed_by=user, removed_time=time.time())
        self._commit([gone if e.id == gone.id else e for e in self.entries])
        return gone

    def _commit(self, entries: list[OverlayEntry]) -> None:
        doc = {
            "schema": SCHEMA,
            "dim": self.dim,
            "version": self.version + 1,
            "entries": [e.to_json() for e in entries],
        }
        path = self.folder / INDEX_FILE
        tmp = self.folder / f".{INDEX_FILE}.tmp"
        try:
            with tmp.open("w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise OverlayError(f"cannot write {path}: {err}") from None
        self.entries, self.version = entries, self.version + 1


def classify(
    vector: np.ndarray, examples: np.ndarray, labels: list[str], *, max_distance: float, neighbours: int
) -> tuple[str, float | None]:
    """A pooled region vector's class: a vote of its ``neighbours`` nearest labelled examples by
    cosine distance, weighted by closeness; ``("unknown", None)`` when no example lies within
    ``max_distance``. The confidence is the winning class's share of the vote times its nearest
    example's closeness (1 - distance / max_distance), in 0..1."""
    if len(labels) == 0:
        return "unknown", None
    v = vector / max(float(np.linalg.norm(vector)), 1e-12)
    e = examples / np.maximum(np.linalg.norm(examples, axis=1, keepdims=True), 1e-12)
    dist = 1.0 - e @ v
    order = np.argsort(dist)[: max(1, neighbours)]
    near = [i for i in order if dist[i] <= max_distance]
    if not near:
        return "unknown", None
    votes: dict[str, float] = {}
    for i in near:
        votes[labels[i]] = votes.get(labels[i], 0.0) + (1.0 - float(dist[i]) / max_distance)
    best = max(votes, key=lambda k: votes[k])
    closest = min(float(dist[i]) for i in near if labels[i] == best)
    share = votes[best] / sum(votes.values())
    return best, round(share * (1.0 - closest / max_distance), 4)


TOP_PATCHES = 3  # patches pooled into a defect's vector: its most anomalous ones


def region_rows(
    features: np.ndarray,
    box: tuple[int, int, int, int],
    *,
    stride: int,
    margin_px: int,
    patch_scores: np.ndarray | None = None,
    first_row: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The patch features (h, w, D) of a frame under a defect's ``box`` (x, y, w, h, frame
    pixels): (every patch of the box grown by ``margin_px``, rows (n, D): what a false alarm adds
    to the bank; one pooled vector (1, D), L2-normalised: what a label stores and what
    classification compares).

    The pooled vector is the mean of the box's ``TOP_PATCHES`` highest-scoring patches
    (``patch_scores`` (rows, w) from patch row ``first_row`` on), else of all its patches. A
    detected box is the thresholded map's, wider than the defect (the map is smoothed): a small
    pit's box is mostly normal strip, whose mean says little about the pit (on the synthetic
    strip, 5-shot accuracy over six kinds: 0.66 with the box mean, 0.95 with the top 2 to 4)."""
    gh, gw, dim = features.shape
    x, y, w, h = box

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        a, b = max(0, lo // stride), min(n, -(-hi // stride))
        return (a, max(a + 1, b)) if a < n else (n - 1, n)

    r0, r1 = span(y - margin_px, y + h + margin_px, gh)
    c0, c1 = span(x - margin_px, x + w + margin_px, gw)
    grown = features[r0:r1, c0:c1].reshape(-1, dim)
    br0, br1 = span(y, y + h, gh)
    bc0, bc1 = span(x, x + w, gw)
    inner = features[br0:br1, bc0:bc1].reshape(-1, dim)
    vector = inner.mean(axis=0)
    if patch_scores is not None:
        s0, s1 = max(0, br0 - first_row), min(patch_scores.shape[0], br1 - first_row)
        if s1 > s0:
            scores = patch_scores[s0:s1, bc0:bc1].reshape(-1)
            rows = features[first_row + s0 : first_row + s1, bc0:bc1].reshape(-1, dim)
            vector = rows[np.argsort(scores)[-TOP_PATCHES:]].mean(axis=0)
    pooled = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return np.ascontiguousarray(grown, np.float32), pooled[None].astype(np.float32)
