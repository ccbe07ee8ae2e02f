"""What ``cbst demo`` computes: its FLOPs per kind of step times the counts it runs, and its times.

Usage: python benchmarks/demo_budget.py [--model ARCH] [--demo-dir cbst-demo]

Prints JSON lines. The FLOP lines need no data and no training: each kind of step (a training
step of ``batch_images`` crops, forward and backward; one pseudo-label inference of a target
image, with flipping when the demo flips; one evaluation of a val image) is counted once with
``torch.utils.flop_counter`` on the demo's network, through the code paths the demo runs, and
multiplied by the number of such steps the demo's settings imply (source epochs, the round
schedule's source portions, images per split). ``--model`` counts ``cbst demo --model ARCH``
instead. The count does not depend on the machine: a machine's time for the demo is about the
total over its sustained FLOP rate on this network (a rate that differs between networks).
``--demo-dir`` adds the measured wall time of each stage of a finished ``cbst demo`` folder
(rendering, source training, and per method the pseudo-label, training and evaluation stages of
each round), read from the files the demo wrote and their write times.
"""

from __future__ import annotations

import argparse
import inspect
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from cbst.demo import DEFAULT_METHODS, DemoSettings, benchmark_of, settings_for
from cbst.inference import InferencePlan, network_outputs
from cbst.losses import CrossEntropyLoss
from cbst.models import build_model
from cbst.rounds import round_schedule, source_subset
from cbst.synthetic.writer import make_synthetic

WIDTH, HEIGHT = inspect.signature(make_synthetic).parameters["size"].default
"""The benchmark's image size: ``make_synthetic``'s default, which the demo renders."""


def conv_backward_flops(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    _groups: int,
    output_mask: list[bool],
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``aten.convolution_backward``: each gradient it computes (input, weight) takes
    the multiplications of the forward convolution.

    torch's own formula counts the weight gradient of a grouped convolution as if it were dense,
    ``groups`` times too many (1,024 times for DAFormer's depthwise ASPP convolutions).
    """
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` computes, as ``torch.utils.flop_counter`` counts them (with
    :func:`conv_backward_flops` for the backward pass of convolutions)."""
    counter = FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}
    )
    with counter:
        fn()
    return counter.get_total_flops()


def step_flops(s: DemoSettings) -> dict[str, int]:
    """FLOPs of one training step, one pseudo-label inference and one evaluation inference."""
    model = build_model(s.model, 19)
    crops = torch.randn(s.batch_images, 3, s.crop_size, s.crop_size)
    labels = torch.randint(0, 19, (s.batch_images, s.crop_size, s.crop_size))

    loss = CrossEntropyLoss()  # the training loop's default loss

    def train_step() -> None:
        model.train()
        loss(model(crops), labels).backward()

    image = torch.randint(0, 256, (1, 3, HEIGHT, WIDTH), dtype=torch.uint8)

    def infer(flip: bool) -> Callable[[], object]:
        plan = InferencePlan.for_model(model, None, (1.0,), flip)

        def run() -> object:
            model.eval()
            with torch.no_grad():
                return list(network_outputs(model, image, plan, amp=False))

        return run

    return {
        "train_step": flops(train_step),
        "pseudo_label": flops(infer(s.pseudo_flip)),
        "evaluate": flops(infer(False)),
    }


def step_counts(s: DemoSettings, methods: tuple[str, ...]) -> dict[str, int]:
    """How many of each step the demo runs: source training plus every round of every method."""
    source_steps = s.source_epochs * (s.num_source // s.batch_images)
    plans = round_schedule(
        s.num_round,
        init_tgt_port=s.init_tgt_port,
        init_src_port=s.init_src_port,
        step_src_port=s.step_src_port,
        max_src_port=s.max_src_port,
        epoch_per_round=s.epoch_per_round,
    )
    round_steps = sum(
        s.epoch_per_round
        * ((len(source_subset(s.num_source, p.src_portion, 0)) + s.num_train) // s.batch_images)
        for p in plans
    )
    examples = 3 * (1 + len(methods))  # _write_examples: three val images per row
    return {
        "source_train_steps": source_steps,
        "round_train_steps": round_steps * len(methods),
        "pseudo_label_images": s.num_train * s.num_round * len(methods),
        "evaluate_images": s.num_val * (1 + s.num_round * len(methods)) + examples,
    }


def budget(s: DemoSettings, methods: tuple[str, ...]) -> list[dict]:
    """One record per kind of work (FLOPs per step, count, total) and the demo's total."""
    per = step_flops(s)
    counts = step_counts(s, methods)
    kinds = [
        ("source training", "train_step", "source_train_steps"),
        ("self-training rounds: training", "train_step", "round_train_steps"),
        ("self-training rounds: pseudo-labels", "pseudo_label", "pseudo_label_images"),
        ("evaluation", "evaluate", "evaluate_images"),
    ]
    records = [
        {
            "kind": kind,
            "gflop_per_step": round(per[step] / 1e9, 3),
            "count": counts[count],
            "tflop": round(per[step] * counts[count] / 1e12, 2),
        }
        for kind, step, count in kinds
    ]
    total = sum(per[step] * counts[count] for _, step, count in kinds)
    records.append(
        {"kind": "total", "tflop": round(total / 1e12, 2), "model": s.model, "methods": list(methods)}
    )
    return records


def stage_times(demo_dir: Path) -> list[dict]:
    """Measured seconds of each stage of a finished demo folder (a seed's folder of ``cbst demo
    --seeds`` reads the benchmark its parent shares)."""
    from cbst.report.runs import load_run

    result = json.loads((demo_dir / "results.json").read_text())
    render = json.loads((benchmark_of(demo_dir) / "synthetic.json").read_text())
    source_log = [json.loads(line) for line in (demo_dir / "source" / "log.jsonl").read_text().splitlines()]
    records = [
        {"stage": "render benchmark", "seconds": render.get("render_seconds")},
        {"stage": "source training", "seconds": round(sum(r["seconds"] for r in source_log), 1)},
    ]
    for name in [row for row in result["rows"] if row != "Source"]:
        run = load_run(demo_dir / name.lower().replace("-", "_"))
        for stage in ("pseudo", "train", "eval"):
            seconds = [r.seconds[stage] for r in run.rounds]
            records.append({"stage": f"{name} {stage}", "seconds_per_round": seconds})
    records.append({"stage": "demo total", "seconds": result["seconds"], "device": result["device"]})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", type=Path, help="a finished cbst demo folder: add its stage times")
    parser.add_argument(
        "--model", default=DemoSettings().model, help="the demo's --model (default: %(default)s)"
    )
    args = parser.parse_args()
    for record in budget(settings_for(args.model, DemoSettings()), DEFAULT_METHODS):
        print(json.dumps(record))
    if args.demo_dir is not None:
        for record in stage_times(args.demo_dir):
            print(json.dumps(record))


if __name__ == "__main__":
    main()
