"""The mean teacher: EMA schedule, buffers, eval mode."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cbst.teacher import MeanTeacher, ema_alpha_at


def test_alpha_follows_min_of_one_minus_one_over_t_plus_one_and_the_cap():
    for step in range(1, 3000, 37):
        assert ema_alpha_at(step, 0.999) == min(1 - 1 / (step + 1), 0.999)
    assert ema_alpha_at(1, 0.999) == 0.5
    assert ema_alpha_at(10_000, 0.99) == 0.99


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))


def test_weights_and_float_buffers_are_averaged_and_integer_buffers_copied():
    torch.manual_seed(0)
    student = _net()
    teacher = MeanTeacher(student, ema_alpha=0.9)
    reference = {k: v.detach().double().numpy().copy() for k, v in student.state_dict().items()}
    for step in range(1, 8):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p))
        student.train()(torch.randn(2, 3, 5, 5))  # moves the BN running statistics
        teacher.update(student, step)
        a = min(1 - 1 / (step + 1), 0.9)
        for k, v in student.state_dict().items():
            s = v.detach().double().numpy()
            reference[k] = s.copy() if k.endswith("num_batches_tracked") else a * reference[k] + (1 - a) * s
    for k, v in teacher.state_dict().items():
        np.testing.assert_allclose(v.double().numpy(), reference[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert int(teacher.state_dict()["1.num_batches_tracked"]) == 7


def test_the_teacher_labels_in_eval_mode_without_dropout_or_gradients():
    torch.manual_seed(0)
    student = _net()
    teacher = MeanTeacher(student.train(), ema_alpha=0.99)
    x = torch.randn(2, 3, 6, 6)
    a, b = teacher.probabilities(x), teacher.probabilities(x)
    assert torch.equal(a, b)  # dropout off
    assert a.shape == (2, 2, 6, 6) and torch.allclose(a.sum(1), torch.ones(2, 6, 6))
    assert not any(p.requires_grad for p in teacher.model.parameters())
    student.eval()
    expected = student(x).softmax(1)
    torch.testing.assert_close(a, expected)
