from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.acquisition.images import ImageReadError
from pipeline.acquisition.sources import FolderSource, SyntheticSource, VideoSource
from pipeline.config import SourceConfig


def _drain(src) -> list:  # type: ignore[no-untyped-def]
    blocks = []
    while True:
        try:
            b = src.read(timeout=0.1)
        except EOFError:
            return blocks
        if b is not None:
            blocks.append(b)


def test_video_blocks_are_consecutive_lines(tmp_path: Path) -> None:
    path = tmp_path / "strip.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (128, 64), isColor=True)
    for k in range(5):
        w.write(np.full((64, 128, 3), 40 * k, np.uint8))
    w.release()
    blocks = _drain(VideoSource(path=path))
    assert [b.first_line for b in blocks] == [0, 64, 128, 192, 256]
    assert all(b.pixels.shape == (64, 128) and b.pixels.dtype == np.uint8 for b in blocks)
    assert abs(float(blocks[3].pixels.mean()) - 120) < 6


def test_video_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such video"):
        VideoSource(path=tmp_path / "none.avi")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"not a video")
    with pytest.raises(ImageReadError, match="cannot decode"):
        VideoSource(path=junk)


def test_folder_skips_bad_files_and_counts_them(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((32, 64), np.uint8))
    (tmp_path / "b.png").write_bytes(b"corrupt")
    cv2.imwrite(str(tmp_path / "c.png"), np.zeros((32, 80), np.uint8))  # wrong width
    cv2.imwrite(str(tmp_path / "d.png"), np.ones((16, 64), np.uint8))
    src = FolderSource(folder=tmp_path, channels=1)
    blocks = _drain(src)
    assert [b.first_line for b in blocks] == [0, 32] and src.errors == 2


def test_synthetic_strip_length_and_planting() -> None:
    src = SyntheticSource(
        cfg=SourceConfig(block_lines=100, line_rate_hz=None, strip_lines=1000, defects_per_100_frames=300),
        width=128,
        seed=1,
        frame_lines=256,
    )
    blocks = _drain(src)
    assert sum(b.pixels.shape[0] for b in blocks) == 1000
    assert len(src.planted) >= 3
