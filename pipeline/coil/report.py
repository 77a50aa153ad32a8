"""The end-of-coil report: ``report.pdf`` (A4 landscape: header, grading and coil map; periodic
families; worst defects), ``map.png`` (the coil map alone) and ``report.json`` (docs/coil_report.md).

The only ``pipeline/`` module that imports matplotlib: the coil service runs it at coil end, the
daemons never load it (tests/pipeline/test_layering.py). No pyplot: each page is a ``Figure`` of
its own on the Agg canvas, so nothing is shared between calls or threads and no display is needed.
What to draw is computed in ``report_data``; this module only draws and writes.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Affine2D

from pipeline.coil.report_data import (
    FILES,
    SIDES,
    CoilSummary,
    ReportError,
    cd_exaggeration,
    class_colours,
    class_name,
    density,
    density_bin_m,
    family_grid,
    iso_utc,
    map_length_m,
    marker_size,
    merge_labels,
    report_json,
    score_alpha,
    strip_span_mm,
    worst_defects,
)

__all__ = ["CoilSummary", "ReportError", "ReportFiles", "report_json", "write_report"]

FAMILIES_PER_PAGE = 6
_A4_LANDSCAPE_IN = (11.69, 8.27)
_MAP_PNG_IN = (16.0, 7.0)  # at 100 dpi: 1600 px wide
_DISPOSITION_COLOURS = {"prime": "#1a7f37", "secondary": "#b07d00", "hold": "#d35400", "scrap": "#c00000"}
_SIDE_COLOURS = {"top": "#1f4e79", "bottom": "#c55a11"}
_FAMILY_COLOUR = "#d6008f"
_SIZE_REFS_MM2 = (10.0, 100.0, 1000.0)
_SMALL: dict[str, Any] = {"fontsize": 7}
_TITLE: dict[str, Any] = {"fontsize": 14, "fontweight": "bold", "va": "top"}
_UNINSPECTED: dict[str, Any] = {"fc": "#d9d9d9", "ec": "#808080", "hatch": "///", "lw": 0.6}
_CAMERA: dict[str, Any] = {"color": "#7a8a99", "lw": 0.5, "ls": ":"}


@dataclass(frozen=True)
class ReportFiles:
    """Where ``write_report`` put the three files."""

    pdf: Path
    png: Path
    json: Path


def _figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _cd_label(factor: float) -> str:
    return f"CD mm\n(exaggerated ×{factor:.3g})" if factor >= 1 else f"CD mm\n(compressed ×{1 / factor:.3g})"


def _draw_side(ax: Axes, s: CoilSummary, side: str, colours: dict[str, Any], lo_hi: tuple[float, float]) -> None:
    (lo, hi), length = lo_hi, map_length_m(s)
    ax.set(xlim=(0, length), ylim=(lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo)))
    ax.axhspan(lo, hi, color="#f3f3f3", zorder=0)
    for edge in (lo, hi):
        ax.axhline(edge, color="#555555", lw=0.8, zorder=1)
    for cam, c in sorted(s.cameras.items()):
        if c["side"] == side:
            ax.axhline(c["cd_from_mm"], **_CAMERA)
            ax.axhline(c["cd_to_mm"], **_CAMERA)
            ax.text(0.995 * length, (c["cd_from_mm"] + c["cd_to_mm"]) / 2, cam, fontsize=6, color="#7a8a99", ha="right")
    for u in (u for u in s.uninspected if u.side == side):  # outlined: a gap shorter than a pixel still shows
        ax.add_patch(
            Rectangle((u.md_from_m, u.cd_from_mm), u.md_to_m - u.md_from_m, u.cd_to_mm - u.cd_from_mm, **_UNINSPECTED)
        )
    ds = [d for d in s.defects if d.side == side]
    if ds:
        scores = [d.score for d in s.defects]
        rgba = np.array([to_rgba(colours[class_name(d)]) for d in ds])
        rgba[:, 3] = score_alpha(np.array([d.score for d in ds]), min(scores), max(scores))
        size = marker_size(np.array([d.area_mm2 for d in ds]))
        ax.scatter([d.md_m for d in ds], [d.cd_mm for d in ds], s=size, c=rgba, ec="#222222", lw=0.3, zorder=3)
    else:
        ax.text(0.5, 0.5, "no defects", transform=ax.transAxes, ha="center", va="center", color="#666666")
    # The worst page's cards, findable on the map; labels in points so that near ones can join.
    worst = [d for d in worst_defects(s.defects) if d.side == side]
    to_pt = ax.transData + Affine2D().scale(72.0 / ax.figure.dpi)
    at = [(*to_pt.transform((d.md_m, d.cd_mm)), f"#{d.defect_id}") for d in worst]
    for x, y, text in merge_labels(at, 22.0, 8.0):
        md, cd = to_pt.inverted().transform((x, y))
        ax.annotate(text, (md, cd), xytext=(4, 3), textcoords="offset points", fontsize=6)
    for i, f in enumerate(s.families, 1):
        if f.side == side and f.md_m:
            ax.scatter(f.md_m, [f.cd_mm] * len(f.md_m), s=110, fc="none", ec=_FAMILY_COLOUR, lw=0.9, zorder=4)
            kw: dict[str, Any] = {"fontsize": 7, "color": _FAMILY_COLOUR, "fontweight": "bold", "ha": "center"}
            ax.annotate(f"F{i}", (f.md_m[0], f.cd_mm), xytext=(0, 8), textcoords="offset points", **kw)
    box = {"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1}
    label = f"{side.upper()}  {len(ds)} defects"
    ax.text(0.005, 0.97, label, transform=ax.transAxes, fontsize=8, fontweight="bold", va="top", bbox=box)
    ax.tick_params(labelsize=7)


def _draw_map(fig: Figure, s: CoilSummary, rect: tuple[float, float, float, float]) -> None:
    """Both sides (top above bottom) and the density along MD, on one MD axis, in ``rect``
    (left, bottom, right, top figure fractions); the legend to the right of it."""
    left, bottom, right, top = rect
    gs = fig.add_gridspec(3, 1, left=left, bottom=bottom, right=right, top=top, height_ratios=[1, 1, 0.6], hspace=0.3)
    ax_top = fig.add_subplot(gs[0])
    ax_bottom, dens = fig.add_subplot(gs[1], sharex=ax_top), fig.add_subplot(gs[2], sharex=ax_top)
    length, (lo, hi), colours = map_length_m(s), strip_span_mm(s), class_colours(s.defects)
    box = ax_top.get_position()
    # Both panels have one size and one set of limits (strip plus 4 % each side), so one factor holds for both.
    factor = cd_exaggeration(length, (hi - lo) * 1.08, box.width * fig.get_figwidth(), box.height * fig.get_figheight())
    for ax, side in ((ax_top, "top"), (ax_bottom, "bottom")):
        _draw_side(ax, s, side, colours, (lo, hi))
        ax.set_ylabel(_cd_label(factor), **_SMALL)
    for side in SIDES:
        edges, counts = density(s.defects, side, length)
        dens.stairs(counts, edges, color=_SIDE_COLOURS[side], lw=1.2, label=side)
    dens.set_ylabel(f"defects\nper {density_bin_m(length):g} m", **_SMALL)
    dens.set_xlabel("MD (m from the coil head)", fontsize=8)
    dens.set_ylim(0, max(1, max(density(s.defects, side, length)[1].max() for side in SIDES)) * 1.15)
    dens.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    dens.tick_params(labelsize=7)
    dens.grid(True, alpha=0.3)
    dens.legend(fontsize=6, loc="upper right", ncols=2)
    dot: dict[str, Any] = {"ls": "", "marker": "o", "mec": "#222222", "mew": 0.3}
    handles: list[Any] = [Line2D([], [], mfc=c, ms=6, label=k, **dot) for k, c in colours.items()]
    refs = zip(marker_size(np.array(_SIZE_REFS_MM2)), _SIZE_REFS_MM2, strict=True)
    handles += [Line2D([], [], mfc="#bbbbbb", ms=math.sqrt(a), label=f"{r:g} mm²", **dot) for a, r in refs]
    handles += [
        Line2D([], [], ls="", marker="o", mfc="none", mec=_FAMILY_COLOUR, ms=10, label="periodic family"),
        Patch(label="uninspected", **_UNINSPECTED),
        Line2D([], [], label="camera boundary", **_CAMERA),
    ]
    kw = {"fontsize": 7, "frameon": False, "title_fontsize": 7, "labelspacing": 0.9, "borderaxespad": 0}
    ax_top.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="class (opacity: score)", **kw)


def _header(fig: Figure, s: CoilSummary) -> None:
    info, g = s.info, s.grading
    nominal = ((info.width_mm, "mm"), (info.thickness_mm, "mm"), (info.length_m, "m"))
    dims = " × ".join("?" if v is None else f"{v:g} {u}" for v, u in nominal)
    if all(v is None for v, _ in nominal):
        dims = "not sent by Level 2"
    dur = "" if s.started_utc is None or s.ended_utc is None else f"  ({(s.ended_utc - s.started_utc) / 60:.1f} min)"
    per_side = ", ".join(f"{side} {sum(d.side == side for d in s.defects)}" for side in SIDES)
    lines = [
        f"grade {info.grade}",
        f"nominal W × T × L: {dims}",
        f"measured length: {s.length_m:.1f} m",
        f"start: {iso_utc(s.started_utc) or 'unknown'}",
        f"end:   {iso_utc(s.ended_utc) or 'unknown'}{dur}",
        f"defects: {len(s.defects)} ({per_side})",
        f"periodic families: {len(s.families) or 'none'}",
    ]
    fig.text(0.03, 0.965, f"Coil {info.coil_id}", fontsize=17, fontweight="bold", va="top")
    fig.text(0.03, 0.915, "\n".join(lines), fontsize=8, va="top", linespacing=1.5)
    colour = _DISPOSITION_COLOURS.get(g.disposition, "black") if g else "#666666"
    fig.text(0.31, 0.965, "disposition", fontsize=8, va="top", color="#444444")
    fig.text(
        0.31, 0.94, g.disposition.upper() if g else "NOT GRADED", fontsize=24, fontweight="bold", color=colour, va="top"
    )
    if g is None:
        fig.text(0.31, 0.87, "no grading rules applied", fontsize=8, va="top")
        return
    broken = [o for o in g.outcomes if o.broken]
    state = f"{'final' if g.final else 'provisional (coil not ended)'}\nbroken {len(broken)} of {len(g.outcomes)} rules"
    fig.text(0.31, 0.87, f"{state} ({g.grade})", fontsize=8, va="top", linespacing=1.5)
    rows = [f"{'':7}{'rule':38}{'measured':>10}{'limit':>10}  gives"]
    for o in broken + [o for o in g.outcomes if not o.broken]:
        rule = o.rule if len(o.rule) <= 38 else o.rule[:37] + "…"
        rows.append(f"{'BROKEN' if o.broken else 'ok':7}{rule:38}{o.measured:>10.4g}{o.limit:>10.4g}  {o.disposition}")
    if len(rows) > 10:  # the header's room; the JSON has them all
        rows[9:] = [f"… and {len(rows) - 9} more rules (report.json)"]
    for i, row in enumerate(rows if g.outcomes else ["none: this grade has no rules"]):
        red = row.startswith("BROKEN")
        colour, weight = (_DISPOSITION_COLOURS["scrap"], "bold") if red else ("black", "normal" if i else "bold")
        fig.text(
            0.54, 0.965 - 0.019 * i, row, fontsize=7, family="monospace", va="top", color=colour, fontweight=weight
        )


def _families_page(fig: Figure, s: CoilSummary, first: int) -> None:
    fams = s.families[first : first + FAMILIES_PER_PAGE]
    fig.text(0.03, 0.965, "Periodic defect families (roll marks)", **_TITLE)
    if not fams:
        fig.text(0.03, 0.88, "None: no defects repeat along MD on a period grid.", fontsize=11, va="top")
        return
    cols = ["family", "side", "CD mm", "period m", "phase m", "count", "confidence", "confirmed", "roll"]
    cells = [
        [
            f"F{n}",
            f.side,
            f"{f.cd_mm:.0f}",
            f"{f.period_m:.3f}",
            f"{f.phase_m:.3f}",
            str(f.count),
            f"{f.confidence:.2f}",
            "yes" if f.confirmed else "no",
            f.roll or "no roll matches",
        ]
        for n, f in enumerate(fams, first + 1)
    ]
    table_top = 0.92 - 0.03 * (len(fams) + 1)
    tab_ax = fig.add_axes((0.03, table_top, 0.94, 0.92 - table_top))
    tab_ax.axis("off")
    widths = [0.07, 0.07, 0.08, 0.09, 0.09, 0.07, 0.09, 0.08, 0.26]
    table = tab_ax.table(cellText=cells, colLabels=cols, loc="upper center", cellLoc="center", colWidths=widths)
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.4)
    ncols, nrows = min(3, len(fams)), math.ceil(len(fams) / 3)
    # A third of the page wide (two thirds for a lone family) and at most a third tall per plot.
    right, top = 0.07 + 0.9 * max(ncols, 2) / 3, table_top - 0.08
    gs = fig.add_gridspec(
        nrows, ncols, left=0.07, right=right, bottom=max(0.07, top - 0.36 * nrows), top=top, hspace=0.6
    )
    for i, f in enumerate(fams):
        ax = fig.add_subplot(gs[i // 3, i % 3])
        md, offset, missing = family_grid(f)
        ax.axhline(0, color="#555555", lw=0.8)
        ax.plot(missing, np.zeros_like(missing), ls="", marker="x", color="#999999", ms=5, label="grid point, no print")
        ax.plot(md, offset, ls="", marker="o", color=_FAMILY_COLOUR, ms=4, label="print")
        ax.set_title(f"F{first + i + 1} {f.side}, CD {f.cd_mm:.0f} mm, every {f.period_m:.3f} m", fontsize=8)
        ax.set_xlabel("MD (m)", **_SMALL)
        ax.set_ylabel("off the grid (mm)", **_SMALL)
        ax.tick_params(labelsize=6)
        ax.grid(True, alpha=0.3)
    # One legend for the page, under the table: inside the small plots it would hide prints.
    fig.legend(
        *ax.get_legend_handles_labels(), loc="upper right", bbox_to_anchor=(0.97, table_top - 0.01), ncols=2, fontsize=8
    )


def _thumbnail(root: Path | None, rel: str | None) -> np.ndarray | str:
    """The thumbnail as RGB(A) or grey, or why there is none."""
    if rel is None:
        return "no image (none taken)"
    path = None if root is None else root / rel
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED) if path is not None and path.is_file() else None
    if img is None:
        return "no image (file missing)"
    return img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _worst_page(fig: Figure, s: CoilSummary) -> None:
    worst = worst_defects(s.defects)
    fig.text(0.03, 0.965, f"Worst defects by score ({len(worst)} of {len(s.defects)})", **_TITLE)
    if not worst:
        fig.text(0.03, 0.88, "None: no defects on this coil.", fontsize=11, va="top")
    for i, d in enumerate(worst):
        x0, y0 = 0.03 + (i % 4) * 0.24, 0.63 - (i // 4) * 0.29
        ax = fig.add_axes((x0, y0 + 0.1, 0.21, 0.17), xticks=[], yticks=[])
        img = _thumbnail(s.thumbs_root, d.thumbnail)
        if isinstance(img, str):
            ax.set_facecolor("#eeeeee")
            ax.text(0.5, 0.5, img, ha="center", va="center", fontsize=9, color="#666666", transform=ax.transAxes)
        else:
            top = 65535 if img.dtype == np.uint16 else 255
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=top, interpolation="nearest")
        text = (
            f"#{d.defect_id}  {d.side}  score {d.score:.3g}\nMD {d.md_m:.2f} m   CD {d.cd_mm:.0f} mm\n"
            f"{d.length_mm:.0f} × {d.width_mm:.0f} mm, {d.area_mm2:.0f} mm²\nclass: {class_name(d)}\n"
            f"cameras: {', '.join(d.cameras) or '-'}"
        )
        fig.text(x0, y0 + 0.09, text, fontsize=7.5, va="top", linespacing=1.35)


def _pdf_bytes(s: CoilSummary) -> bytes:
    family_pages = max(1, math.ceil(len(s.families) / FAMILIES_PER_PAGE))
    pages = [_figure(_A4_LANDSCAPE_IN) for _ in range(family_pages + 2)]
    _header(pages[0], s)
    _draw_map(pages[0], s, (0.08, 0.06, 0.84, 0.745))
    for k in range(family_pages):
        _families_page(pages[1 + k], s, k * FAMILIES_PER_PAGE)
    _worst_page(pages[-1], s)
    buf = io.BytesIO()
    with PdfPages(buf, metadata={"Title": f"Coil {s.info.coil_id} report", "Creator": "stripinspect"}) as pdf:
        for n, fig in enumerate(pages, 1):
            footer = f"stripinspect coil report · coil {s.info.coil_id} · page {n}/{len(pages)}"
            fig.text(0.97, 0.015, footer, fontsize=6, ha="right", color="#666666")
            pdf.savefig(fig)
    return buf.getvalue()


def _png_bytes(s: CoilSummary) -> bytes:
    fig = _figure(_MAP_PNG_IN)
    title = f"Coil {s.info.coil_id} ({s.info.grade}): {s.grading.disposition.upper() if s.grading else 'not graded'}"
    fig.text(0.06, 0.97, title, fontsize=12, fontweight="bold", va="top")
    _draw_map(fig, s, (0.06, 0.08, 0.87, 0.9))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    # Temp file beside the target, synced, then renamed over it: a crash leaves the old file or the new one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_report(summary: CoilSummary, out_dir: Path) -> ReportFiles:
    """Render all three files in memory, then write each atomically (report.json last, so that
    a report.json means the PDF and PNG beside it are complete)."""
    files = ReportFiles(pdf=out_dir / FILES["pdf"], png=out_dir / FILES["png"], json=out_dir / FILES["json"])
    doc = json.dumps(report_json(summary), indent=2, allow_nan=False).encode()
    rendered = ((files.pdf, _pdf_bytes(summary)), (files.png, _png_bytes(summary)), (files.json, doc))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for path, data in rendered:
            _write_atomic(path, data)
        # The renames themselves survive a power cut only once the folder is synced.
        dir_fd = os.open(out_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise ReportError(f"cannot write coil {summary.info.coil_id} report to {out_dir}: {err}") from None
    return files
