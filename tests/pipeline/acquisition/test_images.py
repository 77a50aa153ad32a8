"""Image folders as a user brings them: 8- and 16-bit, grey and RGB, every bad file named."""

from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.acquisition.images import ImageReadError, read_image, survey_training_folder


def test_sixteen_bit_files_come_from_their_full_range(tmp_path: Path) -> None:
    values = np.array([[0, 257, 128 * 257, 65535, 32767, 129]], np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), values)
    img = read_image(tmp_path / "a.png")
    assert img.dtype == np.uint8 and img.shape == (1, 6, 1)
    # value * 255 / 65535 to the nearest integer, whatever range the values happen to span
    assert img[0, :, 0].tolist() == [0, 1, 128, 255, round(32767 * 255 / 65535), round(129 * 255 / 65535)]
    rgb = np.dstack([values, values // 2, values // 4])
    cv2.imwrite(str(tmp_path / "c.png"), rgb)
    colour = read_image(tmp_path / "c.png")
    assert colour.shape == (1, 6, 3) and colour[0, 3].tolist() == [64, 127, 255]  # BGR file -> RGB
    cv2.imwrite(str(tmp_path / "f.tiff"), values.astype(np.float32))
    with pytest.raises(ImageReadError, match="float32 pixels; 8- and 16-bit"):
        read_image(tmp_path / "f.tiff")


def test_survey_reads_every_file_and_picks_one_channel_count(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((100, 120), np.uint8))
    cv2.imwrite(str(tmp_path / "b.png"), np.zeros((630, 200), np.uint16))
    grey = survey_training_folder(tmp_path)
    assert grey.channels == 1 and grey.sizes == [(100, 120), (630, 200)]
    assert [f.name for f in grey.files] == ["a.png", "b.png"]
    cv2.imwrite(str(tmp_path / "c.png"), np.zeros((50, 60, 3), np.uint8))
    assert survey_training_folder(tmp_path).channels == 3  # one colour file: the folder is colour
    assert read_image(tmp_path / "a.png", 3).shape == (100, 120, 3)


def test_survey_names_every_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no images"):
        survey_training_folder(tmp_path)
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((64, 64), np.uint8))
    with pytest.raises(ImageReadError, match="1 image; fitting needs at least 2"):
        survey_training_folder(tmp_path)
    for i in range(7):
        (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
    with pytest.raises(ImageReadError) as err:
        survey_training_folder(tmp_path)
    message = str(err.value)
    assert "7 of 8 images cannot be read" in message and "\n" not in message
    assert all(f"bad{i}.png (not a decodable image" in message for i in range(5))
    assert message.endswith("; and 2 more")
