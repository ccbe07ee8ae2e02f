"""What a self-training run tells as it goes: the source baseline, per-round results, logs."""

from __future__ import annotations

import json

import pytest

from cbst.report.runs import load_run
from cbst.selftrain import self_train


def _tensorboard_losses(folder) -> dict[str, list[float]]:
    """Every ``*/train/loss`` series in the TensorBoard event files under ``folder``."""
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = accumulator.EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [e.value for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.endswith("train/loss")
    }


@pytest.mark.slow
def test_a_quiet_run_prints_logs_and_records_its_source_baseline(self_train_config, tmp_path, capsys):
    out = tmp_path / "run"
    results = self_train(self_train_config(out, tensorboard=True))
    printed = capsys.readouterr().out.splitlines()
    lines = [line for line in printed if "mIoU" in line]
    assert [line.split(":")[0] for line in lines] == ["source model", "round 0", "round 1"]
    assert lines[1] == f"round 0: mIoU {100 * results[0]['miou']:.1f}"

    state = json.loads((out / "state.json").read_text())["finished"]
    assert state[0] == "source/eval"
    saved = json.loads((out / "results.json").read_text())
    source = json.loads((out / "source_metrics.json").read_text())
    assert saved["source"] == source and 0 <= source["miou"] <= 1
    assert saved["provenance"]["precision"] == "float32"  # --device cpu on a CPU without native bf16
    assert set(saved["provenance"]) >= {"device", "cpu", "cpu_native_bf16", "torch", "cbst", "threads"}
    assert json.loads((out / "round_1" / "metrics.json").read_text())["provenance"]["device"] == "cpu"
    assert load_run(out).source.miou == pytest.approx(source["miou"])  # the report's Source row

    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert [r["round"] for r in epochs] == [0, 1]
    for record in epochs:
        assert record["steps"] and all(len(s) == 3 for s in record["steps"])  # iteration, loss, lr
        assert record["steps"][-1][1] == pytest.approx(record["loss"])
        assert record["lr"] == pytest.approx(0.01 / (2**0.5) ** record["round"])
    pseudo = [r for r in records if r["kind"] == "pseudo"]
    assert [r["round"] for r in pseudo] == [0, 1]
    assert sum(pseudo[0]["class_shares"].values()) == pytest.approx(1.0)
    stats = json.loads((out / "round_0" / "stats.json").read_text())
    assert pseudo[0]["thresholds"] == stats["thresholds"]
    val = [r for r in records if r["kind"] == "val"]
    assert [r["miou"] for r in val] == [results[0]["miou"], results[1]["miou"]]
    assert [r["miou"] for r in records if r["kind"] == "source"] == [source["miou"]]

    losses = _tensorboard_losses(out / "tensorboard")
    assert set(losses) == {"round_0/train/loss", "round_1/train/loss"}
    for record in epochs:
        assert losses[f"round_{record['round']}/train/loss"] == pytest.approx([s[1] for s in record["steps"]])


def test_progress_bars_name_the_round_and_a_finished_run_says_so(self_train_config, tmp_path, capsys):
    out = tmp_path / "run"
    self_train(self_train_config(out, num_round=1, progress=True, source_eval=False))
    bars = capsys.readouterr().err
    for name in ("round 1/1 · pseudo-labels", "round 1/1 · train epoch 1/1", "round 1/1 · evaluate"):
        assert name in bars
    with pytest.raises(ValueError, match="finished; use --num-round N with --resume to add rounds"):
        self_train(self_train_config(out, num_round=1))
    assert not (out / "source_metrics.json").exists()  # --no-source-eval


def test_the_source_stage_resumes_only_with_the_same_weights(bench, self_train_config, tmp_path):
    from cbst import selftrain

    out = tmp_path / "run"
    cfg = self_train_config(out, num_round=1, resume=True)
    selftrain._prepare_output(cfg)
    selftrain._write_config(out, cfg)
    (out / "state.json").write_text(json.dumps({"finished": ["source/eval"]}))
    other = tmp_path / "other.pt"
    other.write_bytes((bench / "source.pt").read_bytes())
    with pytest.raises(ValueError, match="source model's evaluation.*--weights"):
        selftrain._prepare_output(self_train_config(out, num_round=1, resume=True, weights=str(other)))


def test_a_user_logger_registers_and_receives_steps_and_records(tmp_path, monkeypatch):
    import sys

    from cbst.errors import ConfigError
    from cbst.loggers import logger_names, open_loggers
    from cbst.registry import LOGGERS

    seen = []

    @LOGGERS.register("memory_for_test")
    class MemoryLogger:
        def __init__(self, output):
            self.output = output

        def step(self, values, step, context):
            seen.append(("step", dict(values), step, dict(context)))

        def record(self, kind, values, step, context):
            seen.append((kind, dict(values), step, dict(context)))

        def close(self):
            seen.append(("closed",))

    group = open_loggers(logger_names(["jsonl", "memory_for_test"], tensorboard=False), tmp_path)
    group.scoped(round=3).step({"loss": 0.5, "lr": 0.1}, 7)
    group.scoped(round=3).record("epoch", {"loss": 0.5}, 1)
    group.close()
    assert seen == [
        ("step", {"loss": 0.5, "lr": 0.1}, 7, {"round": 3}),
        ("epoch", {"loss": 0.5}, 1, {"round": 3}),
        ("closed",),
    ]
    line = json.loads((tmp_path / "log.jsonl").read_text())
    assert line == {"kind": "epoch", "round": 3, "loss": 0.5, "steps": [[7, 0.5, 0.1]]}
    with pytest.raises(ConfigError, match="unknown logger 'nope'"):
        open_loggers(["nope"], tmp_path)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"--tensorboard needs the 'tensorboard' package"):
        open_loggers(logger_names([], tensorboard=True), tmp_path)
