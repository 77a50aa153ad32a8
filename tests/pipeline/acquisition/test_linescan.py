import numpy as np
import pytest

from pipeline.acquisition.linescan import BadBlockError, LineAssembler
from pipeline.transport.messages import LineBlock


def _strip(lines: int, width: int) -> np.ndarray:
    return (np.arange(lines * width).reshape(lines, width) % 251).astype(np.uint8)


@pytest.mark.parametrize("block", [1, 7, 64, 300])
def test_frames_overlap_and_cover_every_line_once(block: int) -> None:
    strip = _strip(1000, 16)
    asm = LineAssembler(width=16, channels=1, lines=128, overlap=32, mm_per_line=0.5, camera_id="c0")
    frames = []
    for s in range(0, 1000, block):
        frames += asm.push(LineBlock(pixels=strip[s : s + block], first_line=s, capture_time=float(s)))
    assert [f.frame_id for f in frames] == list(range(len(frames)))
    assert len(frames) == (1000 - 32) // 96
    owned = []
    for f in frames:
        assert np.array_equal(f.pixels[:, :, 0], strip[f.first_line : f.first_line + 128])
        assert f.md_m == pytest.approx(f.first_line * 0.5 / 1000)
        owned += range(f.first_line + f.valid_from, f.first_line + f.valid_to)
    # Each line belongs to exactly one frame's valid rows, without gaps.
    assert owned == list(range(owned[0], owned[-1] + 1)) and owned[0] == 0


@pytest.mark.parametrize(
    ("pixels", "first_line", "reason"),
    [
        (np.zeros((10, 8), np.uint8), 11, "line_gap"),
        (np.zeros((10, 8), np.uint8), 5, "repeated_lines"),
        (np.zeros((10, 8), np.uint8), 0, "repeated_lines"),
        (np.zeros((10, 9), np.uint8), 10, "wrong_shape"),
        (np.zeros((10, 8, 3), np.uint8), 10, "wrong_shape"),
        (np.zeros((0, 8), np.uint8), 10, "empty"),
        (np.zeros((10, 8), np.float32), 10, "wrong_dtype"),
        (np.full((10, 8), np.nan, np.float32), 10, "non_finite"),
        (np.zeros((10, 8), np.uint16), 10, "wrong_dtype"),
    ],
)
def test_bad_blocks_are_refused_with_a_reason(pixels: np.ndarray, first_line: int, reason: str) -> None:
    asm = LineAssembler(width=8, channels=1, lines=32, overlap=8, mm_per_line=1.0, camera_id="c0")
    asm.push(LineBlock(pixels=np.zeros((10, 8), np.uint8), first_line=0, capture_time=0.0))
    with pytest.raises(BadBlockError) as err:
        asm.push(LineBlock(pixels=pixels, first_line=first_line, capture_time=0.0))
    assert err.value.reason == reason
    # A refused block changes nothing: the sequence continues where it was.
    frames = asm.push(LineBlock(pixels=np.ones((30, 8), np.uint8), first_line=10, capture_time=0.0))
    assert [f.first_line for f in frames] == [0]
    asm.reset()
    assert (
        asm.push(LineBlock(pixels=np.zeros((40, 8), np.uint8), first_line=500, capture_time=0.0))[0].first_line == 500
    )
