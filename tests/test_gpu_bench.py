"""benchmarks/gpu_bench.py --smoke and benchmarks/gpu_check.sh --dry-run: the GPU checks' logic on the CPU.

The smoke run's measurements (the online step's too) are the full run's code at tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _bench_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", REPO / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", module)  # its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_one_line_per_measurement(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    try:
        _bench_module(monkeypatch).main(["--smoke", "--out", str(tmp_path / "bench.jsonl")])
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [(r["measure"], r.get("mode")) for r in lines] == [
        ("pseudo_labels", None),
        ("evaluate", None),
        ("train", "default"),
        ("train", "fp32_strict"),
        ("online_step", None),
    ]
    assert all(r["img_per_s"] > 0 and "peak_mem_gib" in r and r["device"] for r in lines)
    online = lines[-1]
    assert online["arch"] == "small" and online["batch"] == [2, 2] and online["crop"] == [64, 64]
    assert online["img_per_s"] == pytest.approx(4 / online["step_s"], rel=0.01)


def test_gpu_check_dry_run_lists_its_steps(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "gpu_bench.py --out" in done.stdout and "pytest" in done.stdout
    assert (tmp_path / "gpu_check.log").is_file()


@pytest.mark.slow
def test_smoke_run_covers_the_transformers(tmp_path, monkeypatch):
    """DINOv2, the family whose inputs are padded to its patch size 14; the MiT families go the
    same way through the benchmark (their commands: test_backbone_commands.py)."""
    threads = torch.get_num_threads()
    archs = "dinov2_vit_s14"
    try:
        _bench_module(monkeypatch).main(["--smoke", "--archs", archs, "--out", str(tmp_path / "bench.jsonl")])
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    for arch in archs.split(","):
        mine = [(r["measure"], r.get("batch"), r.get("crop")) for r in lines if r["arch"] == arch]
        assert mine == [("pseudo_labels", None, None), ("evaluate", None, None), ("train", 2, [64, 64])]
    assert all(r["img_per_s"] > 0 for r in lines)
