"""ResNet-38 "A1" (``rna-a1``, stride 8) as CBST-MX builds it in MXNet (docs/method.md §10.1).

Modules carry the MXNet layer names (``conv1a``, ``res2a_branch2a``, ``bn2a_branch2a``, ...,
``bn7``, ``conv6a``; ``linear{C}`` is ``classifier``), so a ``.params`` file (read by
``cbst.mxnet``) converts by renaming: ``resnet38_state_dict_from_params`` at the end of this
module. Pre-activation blocks: every conv is preceded by its own BN+ReLU, the projection shortcut
reads the pre-activated input, the identity shortcut the raw input.

**MXNet BatchNorm semantics.** Every BN of this network is built with ``fix_gamma=True``: MXNet
then ignores the stored gamma and scales by 1 (and never trains it). ``MXBatchNorm2d`` honours
this: its ``weight`` is kept for a lossless rename but unused and not trainable, so converted
models give MXNet's outputs whatever gamma the file holds. ``eps = 1.001e-5``. With ``freeze_bn``
(the default, ``use_global_stats`` in CBST training) the moving statistics are frozen and beta
still trains.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbst.errors import ConfigError, WeightsError
from cbst.models.base import Conversion, SegmentationNet, load_strict, lr_group, read_state_dict, some_items
from cbst.mxnet import ParamsError, load_params

BN_EPS = 1.001e-5
HEAD_DILATION = 12


@dataclass(frozen=True)
class Conv:
    """One conv of a block: output channels, kernel, stride, dilation."""

    out: int
    kernel: int = 3
    stride: int = 1
    dilation: int = 1


@dataclass(frozen=True)
class Block:
    """A pre-activation residual block; ``project`` = stride of its 1x1 shortcut, if any."""

    name: str
    inp: int
    convs: tuple[Conv, ...]
    project: int | None = None
    dropout: float = 0.0


def _blocks() -> tuple[Block, ...]:
    """The 17 residual blocks of A1 at output stride 8, in network order."""

    def plain(name: str, c: int) -> Block:
        return Block(name, c, (Conv(c), Conv(c)))

    blocks = [
        Block("2a", 64, (Conv(128, stride=2), Conv(128)), project=2),
        plain("2b1", 128),
        plain("2b2", 128),
        Block("3a", 128, (Conv(256, stride=2), Conv(256)), project=2),
        plain("3b1", 256),
        plain("3b2", 256),
        Block("4a", 256, (Conv(512, stride=2), Conv(512)), project=2),
    ]
    blocks += [plain(f"4b{i}", 512) for i in range(1, 6)]
    blocks += [Block("5a", 512, (Conv(512), Conv(1024, dilation=2)), project=1)]
    blocks += [Block(f"5b{i}", 1024, (Conv(512, dilation=2), Conv(1024, dilation=2))) for i in (1, 2)]
    blocks += [
        Block("6a", 1024, (Conv(512, 1), Conv(1024, dilation=4), Conv(2048, 1)), project=1, dropout=0.3),
        Block("7a", 2048, (Conv(1024, 1), Conv(2048, dilation=4), Conv(4096, 1)), project=1, dropout=0.5),
    ]
    return tuple(blocks)


BLOCKS = _blocks()
BRANCHES = ("branch2a", "branch2b1", "branch2b2")


class MXBatchNorm2d(nn.BatchNorm2d):
    """MXNet BatchNorm with ``fix_gamma=True``: the stored gamma is ignored and 1 is used."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, eps=BN_EPS, momentum=0.1)  # MXNet momentum 0.9 = torch 0.1
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch norm with unit scale, batch statistics only in training mode when not frozen."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, None, self.bias, self.training, self.momentum, self.eps
        )


class ResNet38(SegmentationNet):
    """ResNet-38 A1 FCN with the CBST head: 504x504 -> 63x63, 1024x2048 -> 128x256."""

    output_stride = 8
    pad_multiple = 8
    default_freeze_bn = True

    def __init__(self, num_classes: int, *, freeze_bn: bool = True) -> None:
        super().__init__(freeze_bn)
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        for block in BLOCKS:
            channels = block.inp
            for branch, conv in zip(BRANCHES, block.convs):
                self.add_module(f"bn{block.name}_{branch}", MXBatchNorm2d(channels))
                self.add_module(
                    f"res{block.name}_{branch}",
                    nn.Conv2d(
                        channels,
                        conv.out,
                        conv.kernel,
                        stride=conv.stride,
                        bias=False,
                        padding=conv.dilation * (conv.kernel - 1) // 2,
                        dilation=conv.dilation,
                    ),
                )
                channels = conv.out
            if block.project is not None:
                self.add_module(
                    f"res{block.name}_branch1",
                    nn.Conv2d(block.inp, channels, 1, stride=block.project, bias=False),
                )
            if block.dropout:
                self.add_module(f"res{block.name}_branch2b2_do", nn.Dropout(block.dropout))
        self.bn7 = MXBatchNorm2d(4096)
        self.conv6a = nn.Conv2d(4096, 512, 3, padding=HEAD_DILATION, dilation=HEAD_DILATION)
        self.classifier = nn.Conv2d(512, num_classes, 3, padding=HEAD_DILATION, dilation=HEAD_DILATION)
        self._init_weights()

    def _init_weights(self) -> None:
        """MXNet's init for parameters a checkpoint lacks: He-normal (fan-in) weights, zero biases."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _block(self, block: Block, x: torch.Tensor) -> torch.Tensor:
        """One pre-activation block; dropout sits before the last 1x1 conv of 6a and 7a."""
        h = x
        shortcut = x
        for index, branch in enumerate(BRANCHES[: len(block.convs)]):
            h = F.relu(getattr(self, f"bn{block.name}_{branch}")(h))
            if index == 0 and block.project is not None:
                shortcut = getattr(self, f"res{block.name}_branch1")(h)
            if branch == "branch2b2" and block.dropout:
                h = getattr(self, f"res{block.name}_branch2b2_do")(h)
            h = getattr(self, f"res{block.name}_{branch}")(h)
        return shortcut + h

    def encoder_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output at stride 8 (4096 channels after ``bn7``), what the head reads."""
        x = self.conv1a(x)
        for block in BLOCKS:
            x = self._block(block, x)
        return F.relu(self.bn7(x))

    def forward(
        self, x: torch.Tensor, return_features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits at stride 8 (with ``return_features``: and the encoder's features)."""
        features = self.encoder_features(x)
        logits = self.classifier(F.relu(self.conv6a(features)))
        return (logits, features) if return_features else logits

    def _lr_groups(self) -> list[dict]:
        """CBST-MX 'alex' convention: weights and gammas x1/x1; biases and betas lr x2, wd x0."""
        weights, gammas, biases = [], [], []
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                gammas.append(module.weight)
                biases.append(module.bias)
            elif isinstance(module, nn.Conv2d):
                weights.append(module.weight)
                biases += [module.bias] if module.bias is not None else []
        return [lr_group(weights, 1.0, 1.0), lr_group(gammas, 1.0, 1.0), lr_group(biases, 2.0, 0.0)]

    def load_pretrained(self, source: str | Path) -> None:
        """An MXNet ``.params`` (ImageNet classifier or full CBST model) or a bare state_dict."""
        path = Path(source)
        if str(source) == "imagenet":
            raise ConfigError(
                "ResNet-38 ImageNet weights are not downloadable: give the path of "
                "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
            )
        if path.suffix != ".params":
            load_strict(self, read_state_dict(path), str(path))
            return
        params = load_params(path)
        if not isinstance(params, dict):
            raise WeightsError(f"{path}: an unnamed NDArray list; expected named arg:/aux: arrays")
        imagenet = any(name.endswith("linear1000_weight") for name in params)
        num_classes = self.classifier.out_channels
        self.load_state_dict(
            resnet38_state_dict_from_params(params, num_classes, imagenet=imagenet, source=str(path))
        )

    @classmethod
    def convert(
        cls, path: Path, num_classes: int, *, imagenet: bool = False, limit: int | None = 5
    ) -> Conversion:
        """An MXNet ``.params`` file (a released CBST model, or with ``imagenet`` the ImageNet
        classifier, whose head gets He-normal weights) or a bare state_dict of this network."""
        if path.suffix != ".params":
            if imagenet:
                raise WeightsError(
                    f"{path}: --imagenet with a PyTorch file is only for deeplabv2_resnet101 "
                    "(torchvision ResNet-101)"
                )
            return super().convert(path, num_classes, limit=limit)
        params = load_params(path)
        if not isinstance(params, dict):
            raise WeightsError(f"{path}: an unnamed NDArray list; expected named arg:/aux: arrays")
        if not imagenet and any(k.endswith("linear1000_weight") for k in params):
            raise WeightsError(f"{path}: holds the ImageNet classifier linear1000; add --imagenet")
        warn_stored_gammas(path, params)
        state = resnet38_state_dict_from_params(
            params, num_classes, imagenet=imagenet, source=str(path), limit=limit
        )
        with torch.device("meta"):  # every tensor comes from the file: skip the random init
            model = cls(num_classes, freeze_bn=cls.default_freeze_bn)
        model.load_state_dict(state, assign=True)
        note = "; head (conv6a, classifier) initialised He-normal" if imagenet else ""
        return Conversion(model, len(params), note)


def warn_stored_gammas(path: Path, params: dict[str, np.ndarray]) -> None:
    """Warn, naming the layers, when BN gammas differ from 1: the converted model ignores them.

    ResNet-38 A1 is built with ``fix_gamma=True``. MXNet's plain CPU and cuDNN kernels then use
    1 (cuDNN also writes 1 back, so released files hold 1), but its oneDNN CPU kernel applies the
    stored value, so such a file may have been meant either way.
    """
    layers = [
        name.split(":", 1)[-1][: -len("_gamma")]
        for name, value in params.items()
        if name.endswith("_gamma") and not np.all(value == 1)
    ]
    if layers:
        print(
            f"cbst convert: warning: {path}: batch-norm gamma != 1 in {len(layers)} layers "
            f"({', '.join(layers)}); ResNet-38 uses gamma = 1 (MXNet fix_gamma=True, as its CPU "
            "and cuDNN kernels do), so these values are ignored",
            file=sys.stderr,
        )


# --------------------------------------------------------------------------- MXNet names

_SUFFIXES = {
    "weight": "weight",
    "bias": "bias",
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_var": "running_var",
}
_NAME = re.compile(r"^(?P<module>.+?)_(?P<suffix>moving_mean|moving_var|weight|bias|gamma|beta)$")
_IMAGENET_CLASSIFIER = "linear1000"


def mxnet_to_torch_name(name: str, num_classes: int) -> str | None:
    """``arg:res2a_branch2a_weight`` -> ``res2a_branch2a.weight``; ``linear{C}`` -> ``classifier``."""
    bare = name.split(":", 1)[1] if name.startswith(("arg:", "aux:")) else name
    match = _NAME.match(bare)
    if match is None:
        return None
    module = "classifier" if match["module"] == f"linear{num_classes}" else match["module"]
    return f"{module}.{_SUFFIXES[match['suffix']]}"


def torch_to_mxnet_name(key: str, num_classes: int) -> str:
    """``bn2a_branch2a.running_mean`` -> ``aux:bn2a_branch2a_moving_mean`` (inverse of the above)."""
    module, attr = key.rsplit(".", 1)
    module = f"linear{num_classes}" if module == "classifier" else module
    if attr.startswith("running_"):
        return f"aux:{module}_moving_{attr[len('running_') :]}"
    if module.startswith("bn"):
        attr = {"weight": "gamma", "bias": "beta"}[attr]
    return f"arg:{module}_{attr}"


def _he_normal(shape: torch.Size) -> torch.Tensor:
    """MXNet's Xavier(gaussian, in, 2) initialiser: N(0, sqrt(2 / fan_in))."""
    fan_in = int(np.prod(shape[1:]))
    return torch.randn(shape) * (2.0 / fan_in) ** 0.5


def resnet38_state_dict_from_params(
    params: dict[str, np.ndarray],
    num_classes: int,
    *,
    imagenet: bool = False,
    source: str = "params",
    limit: int | None = 5,
) -> dict[str, torch.Tensor]:
    """Map a ResNet-38 A1 ``.params`` dict onto ``ResNet38`` state_dict keys, strictly.

    With ``imagenet=True`` the input is the stride-32 ImageNet classifier: ``linear1000_*`` is
    dropped and the missing ``conv6a`` and ``classifier`` get He-normal weights and zero biases
    (docs/method.md §2.1). Any missing, unexpected or mis-shaped name raises ``ParamsError`` naming
    the first ``limit`` of each kind and counting the rest (``limit=None``: all of them).
    BN gammas are copied as stored; the model ignores them (MXNet ``fix_gamma=True``).
    """
    with torch.device("meta"):
        full = ResNet38(num_classes).state_dict()
    template = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}
    fresh = {k for k in template if k.startswith(("conv6a.", "classifier."))} if imagenet else set()
    state: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    for name, array in params.items():
        key = mxnet_to_torch_name(name, num_classes)
        if imagenet and key is not None and key.startswith(_IMAGENET_CLASSIFIER + "."):
            continue
        if key is None or key not in template or key in fresh:
            unexpected.append(name)
        elif tuple(array.shape) != tuple(template[key].shape):
            mismatched.append(f"{name} (got {tuple(array.shape)}, expected {tuple(template[key].shape)})")
        else:
            state[key] = torch.from_numpy(np.require(array, np.float32, ["C", "W"]))
    missing = [torch_to_mxnet_name(k, num_classes) for k in template if k not in state and k not in fresh]
    if missing or unexpected or mismatched:
        parts = [
            f"{label}: {some_items(items, limit)}"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if items
        ]
        kind = "ImageNet ResNet-38 A1" if imagenet else f"ResNet-38 A1 with {num_classes} classes"
        raise ParamsError(f"{source}: does not fit {kind}; " + "; ".join(parts))
    for key in sorted(fresh):
        shape = template[key].shape
        state[key] = _he_normal(shape) if key.endswith(".weight") else torch.zeros(shape)
    for key in full.keys() - template.keys():
        state[key] = torch.tensor(0, dtype=torch.long)
    return state
