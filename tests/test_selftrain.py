"""The self-training loop: pseudo-label files, stage bookkeeping, and resume after a kill."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from cbst import selftrain
from cbst.checkpoints import load_checkpoint, save_checkpoint
from cbst.datasets import build_dataset
from cbst.io import read_label
from cbst.labels import CITYSCAPES_19
from cbst.models import build_model
from cbst.pseudo_labels import pseudo_label_pass
from cbst.selftrain import self_train
from cbst.thresholds import ThresholdEstimator, assign_pseudo_labels


def test_pseudo_label_pass_writes_the_labels_of_the_direct_rule(bench, tmp_path):
    model, _ = load_checkpoint(bench / "source.pt")
    target = build_dataset("cityscapes", bench / "data" / "cityscapes", split="train", with_labels=False)
    stats = pseudo_label_pass(
        model, target, tmp_path, portion=0.4, policy="cb", exact=True, flip=False, progress=False
    )
    from cbst.inference import predict_probs

    probs = torch.cat(
        [
            predict_probs(model, torch.as_tensor(target[i]["image"]).permute(2, 0, 1)[None])
            for i in range(len(target))
        ]
    )  # one by one, as the pass does
    estimator = ThresholdEstimator(19, "cb", exact=True)
    estimator.update(probs)
    lam = estimator.thresholds(0.4)
    expected = assign_pseudo_labels(probs, lam).numpy()
    for i, sample in enumerate(target.samples):
        written = read_label(tmp_path / "pseudo_labelIds" / f"{sample.name}.png")
        assert np.array_equal(CITYSCAPES_19.encode(written), expected[i])
    assert stats["thresholds"] == dict(zip(CITYSCAPES_19.class_names, lam.tolist()))
    assert sum(stats["selected_pixels"].values()) == int((expected != 255).sum())
    assert json.loads((tmp_path / "stats.json").read_text())["portion"] == 0.4


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(self_train_config, tmp_path, monkeypatch):
    mining = {"mine_port": 0.8, "source_eval": False}  # many rare-class crops: their draws resume too
    straight = self_train(self_train_config(tmp_path / "straight", **mining))
    assert set(straight) == {0, 1}

    real_train = selftrain._train_round

    def killed_in_round_1(cfg, plan, *args, **kw):
        if plan.index == 1:
            raise KeyboardInterrupt  # as Ctrl-C or a kill between stages
        return real_train(cfg, plan, *args, **kw)

    monkeypatch.setattr(selftrain, "_train_round", killed_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        self_train(self_train_config(tmp_path / "killed", **mining))
    finished = json.loads((tmp_path / "killed" / "state.json").read_text())["finished"]
    assert finished == ["0/pseudo", "0/train", "0/eval", "1/pseudo"]

    monkeypatch.setattr(selftrain, "_train_round", real_train)
    resumed = self_train(self_train_config(tmp_path / "killed", resume=True, **mining))
    a = torch.load(tmp_path / "straight" / "round_1" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "round_1" / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed[1]["miou"] == straight[1]["miou"]


def test_started_run_needs_resume_and_same_config(self_train_config, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"finished": ["0/pseudo"]}))
    with pytest.raises(ValueError, match="--resume"):
        self_train(self_train_config(out))
    cfg = self_train_config(out, resume=True)
    with pytest.raises(ValueError, match="config.yaml: missing"):  # a resume never runs without it
        selftrain._prepare_output(cfg)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.saved_form()))
    selftrain._prepare_output(cfg)
    selftrain._write_config(out, cfg)
    with pytest.raises(ValueError, match="init-tgt-port"):
        selftrain._prepare_output(dataclasses.replace(cfg, init_tgt_port=0.5))


def test_bad_options_fail_before_any_work(self_train_config, tmp_path):
    with pytest.raises(ValueError, match="kc-policy"):
        self_train(self_train_config(tmp_path / "a", kc_policy="class"))
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        self_train(self_train_config(tmp_path / "b", with_prior=str(tmp_path / "nope.npy")))
    assert not (tmp_path / "a").exists()


def test_rounds_load_their_weights_into_one_model(bench, tmp_path):
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_checkpoint(other, build_model("small", 19), arch="small", num_classes=19, protocol="cityscapes19")
    reused = selftrain._RoundModel(torch.device("cpu"), "cityscapes19", compile=False)
    first = reused.load(bench / "source.pt")
    assert reused.load(other) is first is reused.model  # the same module: compiled graphs stay
    want, _ = load_checkpoint(other)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in want.state_dict().items())
    with pytest.raises(ValueError, match="cityscapes19"):
        selftrain._RoundModel(torch.device("cpu"), "synthia16", False).load(other)


def test_compiled_self_training_saves_plain_checkpoints(self_train_config, tmp_path, monkeypatch):
    """Every round runs one wrapper; checkpoints hold the plain module's keys."""
    compiled, compile_for_real = [], torch.compile

    def compile_traced(model):  # dynamo without code generation: the wiring, in seconds
        compiled.append(model)
        return compile_for_real(model, backend="eager")

    monkeypatch.setattr(torch, "compile", compile_traced)
    results = self_train(self_train_config(tmp_path / "run", num_round=2, compile=True))
    assert sorted(results) == [0, 1] and len(compiled) == 1
    state = torch.load(tmp_path / "run" / "round_1" / "model.pt", weights_only=False)["state_dict"]
    assert not any(key.startswith("_orig_mod") for key in state)
    load_checkpoint(tmp_path / "run" / "round_1" / "model.pt")
