"""Seam-free tiling of a frame for the patch-feature network, as pure functions.

A frame is cut into equal overlapping tiles (so they batch into one ONNX call), each tile is
embedded, and the frame's feature grid is stitched from each tile's valid interior: the part
at least ``margin`` pixels away from any tile edge that is not also a frame edge. With the
margin at least the network's effective receptive radius, the stitched grid equals the grid
of the whole frame embedded at once (tested).

Alignment: every tile origin is a multiple of ``align`` (16, the coarsest stride of the
registered backbones), so each tile's convolutions sample the same positions as the whole
frame's and tile feature (i, j) is frame feature (y0 / stride + i, x0 / stride + j).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """Input window [y0, y1) x [x0, x1) in frame pixels; valid feature rows [gy0, gy1) and
    columns [gx0, gx1) in frame grid cells, all multiples of the grid stride."""

    y0: int
    y1: int
    x0: int
    x1: int
    gy0: int
    gy1: int
    gx0: int
    gx1: int


def _axis(length: int, tile: int, margin: int, align: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(start, end, valid_start, valid_end) in pixels along one axis."""
    if length <= tile:
        return [(0, length, 0, length)]
    step = tile - 2 * margin
    # Equal tile sizes: the last tile ends at the frame edge, overlapping its neighbour more.
    starts = [*range(0, length - tile, step), length - tile]
    # Each tile owns the grid cells up to the middle of its overlap with the next tile.
    cuts = [0] + [((starts[k] + tile + starts[k + 1]) // 2) // stride * stride for k in range(len(starts) - 1)]
    cuts.append(length)
    out = [(s, s + tile, cuts[k], cuts[k + 1]) for k, s in enumerate(starts)]
    for s, _, _, _ in out:
        if s % align:
            raise ValueError(f"tile start {s} is not a multiple of {align}")
    return out


def plan_tiles(*, height: int, width: int, tile: int, margin: int, stride: int = 8, align: int = 16) -> list[Tile]:
    """Tiles covering a frame of ``height`` x ``width`` (both multiples of ``align``)."""
    if height % align or width % align:
        raise ValueError(f"frame {height} x {width} must be a multiple of {align} on both sides")
    if tile % align or margin % align or tile <= 2 * margin:
        raise ValueError(f"tile {tile} and margin {margin} must be multiples of {align} with tile > 2 * margin")
    rows = _axis(height, tile, margin, align, stride)
    cols = _axis(width, tile, margin, align, stride)
    return [
        Tile(y0, y1, x0, x1, vy0 // stride, vy1 // stride, vx0 // stride, vx1 // stride)
        for y0, y1, vy0, vy1 in rows
        for x0, x1, vx0, vx1 in cols
    ]


def cut_tiles(frame: np.ndarray, tiles: list[Tile]) -> np.ndarray:
    """(H, W, C) frame -> (T, th, tw, C) batch; all tiles of a plan have one size."""
    return np.stack([frame[t.y0 : t.y1, t.x0 : t.x1] for t in tiles])


def stitch_features(
    tile_features: np.ndarray, tiles: list[Tile], *, height: int, width: int, stride: int = 8
) -> np.ndarray:
    """(T, th, tw, D) tile features -> (height / stride, width / stride, D) frame features."""
    if tile_features.shape[0] != len(tiles):
        raise ValueError(f"{tile_features.shape[0]} tile feature maps for {len(tiles)} tiles")
    out = np.empty((height // stride, width // stride, tile_features.shape[3]), dtype=tile_features.dtype)
    for f, t in zip(tile_features, tiles, strict=True):
        oy, ox = t.y0 // stride, t.x0 // stride
        out[t.gy0 : t.gy1, t.gx0 : t.gx1] = f[t.gy0 - oy : t.gy1 - oy, t.gx0 - ox : t.gx1 - ox]
    return out
