"""The single-pass pseudo-labeller: equal to two full passes, its cache, and its writer."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cbst import datasets, distributed, probability_cache
from cbst.datasets import build_dataset
from cbst.evaluation import write_prediction
from cbst.inference import InferencePlan, combine_outputs, image_batches, predict_probs
from cbst.io import BackgroundWriter, DataError
from cbst.models import build_model
from cbst.priors import apply_prior
from cbst.probability_cache import CACHE_FOLDER, ProbabilityCache
from cbst.pseudo_labels import cache_folder, open_kept_cache, pseudo_label_pass, remove_kept_caches
from cbst.synthetic import make_synthetic
from cbst.thresholds import ThresholdEstimator, assign_pseudo_labels


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """Five labelled target images of 60x36 (neither side a multiple of 8: padded passes)."""
    root = tmp_path_factory.mktemp("pl")
    make_synthetic(root, seed=1, num_source=1, num_train=5, num_val=1, size=(60, 36), progress=False)
    return build_dataset("cityscapes", root / "cityscapes", split="train", with_labels=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("small", 19).eval()


def two_pass_reference(
    model, dataset, out: Path, *, portion, policy, prior, scales, flip, batch_size
) -> tuple[torch.Tensor, float]:
    """Yesterday's algorithm: a full statistics pass, then a second full pass that assigns."""

    def probabilities(images):
        probs = predict_probs(model, images, scales=scales, flip=flip)
        return apply_prior(probs, prior) if prior is not None else probs

    estimator = ThresholdEstimator(19, policy, exact=True)
    for images, _ in image_batches(dataset, batch_size):
        estimator.update(probabilities(images))
    lam = estimator.thresholds(portion)
    correct = judged = 0
    for images, items in image_batches(dataset, batch_size):
        labels = assign_pseudo_labels(probabilities(images), lam)
        for item, label in zip(items, labels.numpy().astype(np.uint8)):
            write_prediction(out, item["name"], label, dataset.protocol, prefix="pseudo_")
            gt = torch.as_tensor(item["label"], dtype=torch.int64)
            mask = (torch.as_tensor(label) < 19) & (gt < 19)
            correct += int((torch.as_tensor(label, dtype=torch.int64)[mask] == gt[mask]).sum())
            judged += int(mask.sum())
    return lam, correct / judged


@pytest.mark.parametrize(
    "policy, scales, with_prior, batch_size, backend",
    [
        ("cb", (1.0,), False, 1, "auto"),
        ("global", (0.75, 1.0), True, 2, "disk"),
    ],
)
def test_exact_single_pass_writes_the_two_pass_pngs_byte_for_byte(
    target, model, tmp_path, policy, scales, with_prior, batch_size, backend
):
    prior = torch.rand(19, 36, 60, generator=torch.Generator().manual_seed(3)) if with_prior else None
    lam, accuracy = two_pass_reference(
        model,
        target,
        tmp_path / "ref",
        portion=0.3,
        policy=policy,
        prior=prior,
        scales=scales,
        flip=True,
        batch_size=batch_size,
    )
    stats = pseudo_label_pass(
        model,
        target,
        tmp_path / "one",
        portion=0.3,
        policy=policy,
        prior=prior,
        scales=scales,
        flip=True,
        exact=True,
        batch_size=batch_size,
        cache_backend=backend,
        progress=False,
    )
    reference = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*.png"))
    assert len(reference) == 2 * len(target)
    for rel in reference:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes(), rel
    assert list(stats["thresholds"].values()) == lam.tolist()
    assert stats["pseudo_label_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert not (tmp_path / "one" / CACHE_FOLDER).exists()


def test_each_image_is_decoded_once_and_the_cache_can_be_kept(target, model, tmp_path, monkeypatch):
    decoded = []
    real = datasets.read_image
    monkeypatch.setattr(datasets, "read_image", lambda path: decoded.append(path) or real(path))
    stats = pseudo_label_pass(
        model, target, tmp_path, portion=0.5, keep_cache=True, long_side=64, progress=False
    )  # 38x64 passes: mirrors merged
    assert len(decoded) == len(target)
    written = sum(
        int((np.asarray(datasets.read_label(p)) != 0).sum())
        for p in (tmp_path / "pseudo_labelIds").glob("*.png")
    )
    assert written == sum(stats["selected_pixels"].values()) > 0
    with ProbabilityCache.open(tmp_path / CACHE_FOLDER) as kept:
        assert len(kept) == len(target) and kept.dtype == torch.float16
        assert len(kept.outputs(0)) == 1
        probs = kept.get(0)
    assert probs.shape == (19, 36, 60)
    expected = predict_probs(model, _image(target, 0), long_side=64, flip=True)[0]
    assert torch.allclose(probs, expected, atol=2e-3)


def _image(dataset, i: int) -> torch.Tensor:
    return torch.as_tensor(dataset[i]["image"]).permute(2, 0, 1)[None]


def _random_outputs(plan: InferencePlan, size, seed: int) -> list[torch.Tensor]:
    """Softmax maps of the shapes a stride-8 network gives for each pass of ``plan``."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(1, 4, -(-h // 8), -(-w // 8), generator=g).softmax(1) for h, w in plan.pass_sizes(*size)
    ]


@pytest.mark.parametrize("backend", ["device", "host", "disk"])
def test_cache_backends_round_trip_exactly(tmp_path, backend):
    plan = InferencePlan(scales=(1.0, 0.5), flip=True)
    size = (20, 28)
    stored = {i: _random_outputs(plan, size, i) for i in range(3)}
    with ProbabilityCache(tmp_path / "c", plan, device="cpu", dtype=torch.float32, backend=backend) as cache:
        for i, outputs in stored.items():
            cache.put(i, [o[0] for o in outputs], size)
        assert {cache.tier_of(i) for i in stored} == {backend}
        for i, outputs in stored.items():
            assert all(torch.equal(a, b[0]) for a, b in zip(cache.outputs(i), outputs))
            assert torch.equal(cache.get(i), combine_outputs(outputs, plan, size)[0])
        batch = cache.get_batch([0, 2])
        expected = combine_outputs([torch.cat(p) for p in zip(stored[0], stored[2])], plan, size)
        assert torch.equal(batch, expected)
        with pytest.raises(ValueError, match="already stored"):
            cache.put(0, [o[0] for o in stored[0]], size)
    assert not (tmp_path / "c").exists()


def test_cache_spills_to_its_file_when_memory_runs_short(tmp_path, monkeypatch):
    plan = InferencePlan()
    outputs = _random_outputs(plan, (16, 16), 0)
    entry_bytes = outputs[0].numel() * 2  # float16
    monkeypatch.setattr(
        probability_cache,
        "available_host_memory",
        lambda: int(1.5 * entry_bytes / probability_cache.HOST_SHARE),
    )
    with ProbabilityCache(tmp_path / "c", plan, device="cpu", keep=True) as cache:
        for i in range(3):
            cache.put(i, [outputs[0][0]], (16, 16))
        assert [cache.tier_of(i) for i in range(3)] == ["host", "disk", "disk"]
        in_memory = [cache.get(i) for i in range(3)]
    with ProbabilityCache.open(tmp_path / "c") as kept:
        assert all(torch.equal(kept.get(i), in_memory[i]) for i in range(3))
        assert torch.allclose(in_memory[0], combine_outputs(outputs, plan, (16, 16))[0], atol=1e-3)


def test_the_caches_kept_by_every_process_read_as_one(tmp_path, monkeypatch):
    """Five images over three processes (every third from its rank), then over one."""
    plan, size = InferencePlan(), (16, 24)
    stored = [_random_outputs(plan, size, i)[0][0] for i in range(5)]
    for world in (3, 1):
        monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
        for rank in range(world):
            monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
            with ProbabilityCache(tmp_path / cache_folder(), plan, device="cpu", keep=True) as cache:
                for position, index in enumerate(distributed.shard(5)):
                    cache.put(position, [stored[index]], size)
        folders = [f"{CACHE_FOLDER}_rank{r}" for r in range(world)] if world > 1 else [CACHE_FOLDER]
        assert sorted(p.name for p in tmp_path.iterdir()) == folders
        kept = open_kept_cache(tmp_path, device="cpu")
        assert len(kept) == 5
        expected = [combine_outputs([o[None].half()], plan, size)[0] for o in stored]
        assert all(torch.equal(kept.get(i), expected[i]) for i in range(5))
        remove_kept_caches(tmp_path)
        assert not list(tmp_path.iterdir())


def test_cache_rejects_a_batch_of_mixed_sizes(tmp_path):
    plan = InferencePlan()
    with ProbabilityCache(tmp_path, plan, device="cpu", backend="host") as cache:
        cache.put(0, [_random_outputs(plan, (16, 16), 0)[0][0]], (16, 16))
        cache.put(1, [_random_outputs(plan, (16, 24), 1)[0][0]], (16, 24))
        with pytest.raises(ValueError, match="different sizes"):
            cache.get_batch([0, 1])


def test_background_writer_names_the_failing_file_and_bounds_its_queue(tmp_path):
    def fail(path):
        raise PermissionError("read-only")

    with pytest.raises(OSError, match=r"b\.png: cannot write \(PermissionError: read-only\)"):
        with BackgroundWriter(threads=1) as writer:
            writer.submit(tmp_path / "a.png", (tmp_path / "a.png").write_text, "ok")
            writer.submit(tmp_path / "b.png", fail, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_text() == "ok"

    release, running = threading.Event(), []

    def slow() -> None:
        running.append(1)
        release.wait(5)

    writer = BackgroundWriter(threads=1, max_pending=2)
    writer.submit("x", slow)
    writer.submit("y", slow)
    blocked = threading.Thread(target=writer.submit, args=("z", slow))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the third write waits for a free slot
    release.set()
    blocked.join(5)
    writer.close()
    assert len(running) == 3


def test_a_broken_image_in_a_loader_worker_stops_the_pass_naming_the_file(target, model, tmp_path):
    broken = tmp_path / "broken_leftImg8bit.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad = target.subset(range(len(target)))
    bad.samples[1] = dataclasses.replace(bad.samples[1], image=broken)
    with pytest.raises(DataError) as failure:
        pseudo_label_pass(model, bad, tmp_path / "out", portion=0.5, num_workers=1, progress=False)
    assert str(failure.value).startswith(f"{broken}: ")
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize("width, merged", [(32, True), (28, False)])
def test_merged_mirror_passes_change_probabilities_by_rounding_only(tmp_path, width, merged):
    plan = InferencePlan(scales=(1.0, 0.5), flip=True)
    size = (16, width)  # a 28-px width is padded: merging is not exact there and is not done
    outputs = [torch.cat([o, o.flip(-1)]) for o in _random_outputs(plan, size, 5)]
    with ProbabilityCache(
        tmp_path, plan, device="cpu", dtype=torch.float32, backend="host", merge_flip=True
    ) as cache:
        probs = cache.store([0, 1], outputs, size)
        assert len(cache.outputs(0)) == (2 if merged else 4)
        assert torch.equal(cache.get_batch([0, 1]), probs)
    unmerged = combine_outputs(outputs, plan, size)
    if merged:
        assert torch.allclose(probs, unmerged, atol=1e-6)
    else:
        assert torch.equal(probs, unmerged)
