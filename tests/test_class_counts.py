"""Per-image class pixel counts: counting, caching in the run folder and stale files."""

from __future__ import annotations

import numpy as np
import pytest

from cbst.class_counts import count_class_pixels, load_pixel_counts, run_pixel_counts
from cbst.errors import DataError


class _Labels:
    """The part of a dataset the counts read: ``len`` and ``label(i)``; counts its decodes."""

    def __init__(self, labels: list[np.ndarray]) -> None:
        self.labels, self.decoded = labels, 0

    def __len__(self) -> int:
        return len(self.labels)

    def label(self, i: int) -> np.ndarray:
        self.decoded += 1
        return self.labels[i]


LABELS = [np.array([[0, 0, 2], [255, 2, 2]], np.uint8), np.array([[1, 255, 255]], np.uint8)]


def test_pixel_counts_per_image_and_class_skip_the_ignore_index():
    counts = count_class_pixels(lambda i: LABELS[i], 2, 3)
    np.testing.assert_array_equal(counts, [[2, 0, 3], [0, 1, 0]])


def test_a_run_counts_once_and_reads_its_file_on_the_next_start(tmp_path):
    data = _Labels(LABELS)
    first = run_pixel_counts(tmp_path / "c.npy", data, 3)
    again = run_pixel_counts(tmp_path / "c.npy", data, 3)
    np.testing.assert_array_equal(first, [[2, 0, 3], [0, 1, 0]])
    np.testing.assert_array_equal(again, first)
    assert data.decoded == 2  # the second start decoded nothing
    assert np.load(tmp_path / "c.npy").dtype == np.int64


def test_a_first_start_counts_again_over_an_earlier_starts_file(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((2, 3), np.int64))  # an interrupted start on other data
    data = _Labels(LABELS)
    counts = run_pixel_counts(tmp_path / "c.npy", data, 3, recount=True)
    np.testing.assert_array_equal(counts, [[2, 0, 3], [0, 1, 0]])
    np.testing.assert_array_equal(np.load(tmp_path / "c.npy"), counts)
    assert data.decoded == 2


def test_a_stale_or_unreadable_counts_file_is_a_data_error_naming_it(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((4, 19), np.int64))
    with pytest.raises(DataError, match=r"c\.npy.*delete it"):
        load_pixel_counts(tmp_path / "c.npy", 5, 19)
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match=r"bad\.npy: unreadable"):
        run_pixel_counts(tmp_path / "bad.npy", _Labels(LABELS), 3)
