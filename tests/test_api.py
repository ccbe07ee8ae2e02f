"""The library API of ``import cbst``: lazy, and the README's Python example runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cbst

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = """\
import cbst

root = cbst.render_synthetic("bench", num_source=40, num_train=20, num_val=10)
model = cbst.build_model("small", num_classes=19)
labels = cbst.predict(model, [root / "cityscapes/leftImg8bit/val/renderdorf/renderdorf_000000_000019_leftImg8bit.png"])
print(labels[0].shape)
"""


def readme_example() -> str:
    """The first python code block under the README's "## Use from Python", else EXAMPLE."""
    text = README.read_text() if README.is_file() else ""
    section = re.search(r"^## Use from Python\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S) if section else None
    return block.group(1) if block else EXAMPLE


def _env() -> dict[str, str]:
    src = str(Path(cbst.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


def test_import_cbst_does_not_import_torch():
    code = "import sys, cbst; print('torch' in sys.modules, sorted(cbst.__all__)[:3])"
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, check=True)
    assert out.stdout.startswith("False"), out.stdout
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cbst.nope  # noqa: B018


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", readme_example()], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "(128, 256)" in out.stdout  # the benchmark's frames are 256x128


def test_predict_load_and_evaluate_agree_with_the_modules(bench, tmp_path):
    import torch

    from cbst.checkpoints import load_checkpoint
    from cbst.datasets import build_dataset
    from cbst.evaluation import evaluate_model
    from cbst.inference import predict_labels

    model = cbst.load_model(bench / "source.pt")
    assert model.protocol.name == "cityscapes19" and not model.training
    val = build_dataset("cityscapes", bench / "data" / "cityscapes", split="val")
    image = val[0]["image"]
    labels = cbst.predict(model, [image, val.samples[0].image], flip=True)
    reference, _ = load_checkpoint(bench / "source.pt")
    want = predict_labels(reference, torch.as_tensor(image).permute(2, 0, 1)[None], flip=True)[0].numpy()
    assert labels[0].dtype == np.uint8 and np.array_equal(labels[0], want)
    assert np.array_equal(labels[1], want)  # the path reads the same image
    with pytest.raises(ValueError, match="image 0: expected an HxWx3 uint8"):
        cbst.predict(model, [image.astype(np.float32)])

    result = cbst.evaluate_checkpoint(bench / "source.pt", "cityscapes", bench / "data" / "cityscapes")
    direct = evaluate_model(reference, val, device="cpu", progress=False)
    assert result["miou"] == pytest.approx(direct.miou) and result["images"] == len(val)
    assert result["checkpoint"]["path"] == str((bench / "source.pt").resolve())
    assert len(result["checkpoint"]["sha256"]) == 64
    assert cbst.SourceTrainConfig.__name__ == "SourceTrainConfig" and callable(cbst.self_train)
