"""cbst's copy of the Cityscapes label table equals the official one in cityscapesscripts."""

from __future__ import annotations

import pytest

from cbst.labels import CITYSCAPES_19, CITYSCAPES_LABELS


def test_the_label_table_is_the_official_one():
    official = pytest.importorskip("cityscapesscripts.helpers.labels")
    assert [(lab.name, lab.id, lab.trainId, tuple(lab.color)) for lab in official.labels] == [
        (lab.name, lab.id, lab.trainId, lab.color) for lab in CITYSCAPES_LABELS
    ]
    names = [lab.name for lab in sorted(official.labels, key=lambda x: x.trainId) if 0 <= lab.trainId < 255]
    assert list(CITYSCAPES_19.class_names) == names
