"""VGG16 perceptual loss on slices of 3D volumes (CG-3DSRGAN paper, Sec. II.B, eq. 3).

Eq. 3 is Johnson et al. (2016)'s feature reconstruction loss summed over a set of layers of a
pre-trained VGG16: ``Σ_i ||φ_i(a) - φ_i(b)||² / (C_i H_i W_i)``. VGG16 is 2D, the volumes are 3D;
the paper does not say how it bridged them. We use the "2.5D" scheme of MONAI's
``PerceptualLoss(is_fake_3d=True)``: cut the volume into 2D slices along each of the three axes,
put the slices in the batch, score a random fraction of them, and combine the three axes.

Choices where the paper is silent (all recorded in ``record``):

* slices: for each axis, ``max(1, int(ratio · B · n_axis))`` slices are drawn without replacement
  from all ``B · n_axis`` slices of the batch (MONAI's ``fake_3d_ratio``, default 0.5), with
  ``torch.randperm`` on PyTorch's global CPU generator, so a seeded run draws the same slices; the
  same slices are taken from ``pred`` and ``target``.
* per layer the squared feature difference is averaged over channels, pixels and slices (eq. 3's
  ``1/(CHW)``, averaged over slices), summed over layers (eq. 3), then *averaged* over the three
  axes (MONAI sums them) so the weight λ₃ means the same as for a 2D perceptual loss.
* VGG input: both volumes are divided by the same per-sample scale, the larger of ``max|target|``
  and ``max|pred|`` (detached), which brings the target into ``[0, 1]`` without blowing up on
  near-empty background patches; the one channel is repeated to RGB and normalised with ImageNet's
  mean and std, as torchvision's VGG16 was trained.
* the target's features are computed without gradient: gradients flow to ``pred`` only.

Weights: ``imagenet`` loads torchvision's ``vgg16-397923af.pth`` (see :mod:`lowdose_toolkit.models.vgg16`
for where it is looked up; nothing is downloaded); ``none`` uses fixed random features (seed 0);
``auto`` uses ImageNet weights when the file is found and otherwise warns and uses ``none``.
"""

import warnings
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register
from lowdose_toolkit.models.vgg16 import (
    LAYERS,
    VGG16Features,
    find_vgg16_weights,
    how_to_get_weights,
    load_vgg16_features,
    sha256_file,
)

RANDOM_SEED = 0
"""Seed of the fixed random VGG16 used by ``weights: none``."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_POOLS = frozenset(i for name, i in LAYERS.items() if name.startswith("pool"))


class PerceptualLoss(nn.Module):
    """VGG16 feature reconstruction loss on 2D slices along the three axes (paper eq. 3).

    Args:
        weights: ``auto`` (ImageNet if found, else random with a warning), ``imagenet`` (error if
            the file is not found) or ``none`` (fixed random features).
        path: torchvision's ``vgg16-397923af.pth``; default ``$LDT_VGG16_WEIGHTS``, then torch hub's
            cache.
        layers: VGG16 activations compared (Johnson et al.'s and the usual choice: the ReLU after the
            last conv of blocks 1-4). Names: ``conv{b}_{i}``, ``relu{b}_{i}``, ``pool{b}``.
        slice_ratio: Fraction of the slices along each axis that are scored, in ``(0, 1]``.

    Example:
        >>> loss = PerceptualLoss(weights="none")
        >>> x = torch.rand(1, 1, 16, 16, 16)
        >>> float(loss(x, x))
        0.0
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"weights": "none"}

    def __init__(
        self,
        weights: Literal["auto", "imagenet", "none"] = "auto",
        path: str | None = None,
        layers: list[str] = ["relu1_2", "relu2_2", "relu3_3", "relu4_3"],  # noqa: B006 (copied)
        slice_ratio: float = 0.5,
    ) -> None:
        super().__init__()
        if weights not in ("auto", "imagenet", "none"):
            raise UserError(f"perceptual: weights={weights!r} must be one of 'auto', 'imagenet', 'none'")
        if not layers:
            raise UserError("perceptual: layers is empty; name at least one VGG16 layer, e.g. [relu2_2]")
        unknown = [name for name in layers if name not in LAYERS]
        if unknown:
            raise UserError(f"perceptual: unknown VGG16 layers {unknown}; choose from {', '.join(LAYERS)}")
        if not 0.0 < slice_ratio <= 1.0:
            raise UserError(f"perceptual: slice_ratio={slice_ratio} must be in (0, 1]")
        if weights == "none" and path is not None:
            raise UserError(f"perceptual: path={path!r} is unused with weights: none; remove one of them")
        self.weights = weights
        self.path = path
        self.layers = list(layers)
        self.slice_ratio = slice_ratio

        found = None if weights == "none" else find_vgg16_weights(path)
        if weights == "imagenet" and found is None:
            raise UserError(f"perceptual: VGG16 ImageNet weights not found; {how_to_get_weights()}")
        if weights == "auto" and found is None:
            warnings.warn(
                "perceptual loss: VGG16 ImageNet weights not found, using FIXED RANDOM VGG16 features "
                f"(weights: none) instead; to use the paper's pre-trained VGG16, {how_to_get_weights()}",
                UserWarning,
                stacklevel=2,
            )
        if found is None:
            self.vgg = VGG16Features(seed=RANDOM_SEED)
            used = {"weights": "none", "path": None, "sha256": None, "seed": RANDOM_SEED}
        else:
            self.vgg = load_vgg16_features(found)
            used = {"weights": "imagenet", "path": str(found), "sha256": sha256_file(found)[:16]}
        self.record: dict[str, Any] = {
            "network": "vgg16",
            "requested": weights,
            **used,
            "layers": self.layers,
            "slice_ratio": slice_ratio,
        }
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._deepest = max(self.layers, key=LAYERS.__getitem__)
        self._min_side = 2 ** sum(1 for i in _POOLS if i < LAYERS[self._deepest])

    def _to_vgg(self, slices: torch.Tensor) -> torch.Tensor:
        """``[N, 1 or 3, H, W]`` in ``[0, 1]`` → ImageNet-normalised RGB."""
        if slices.shape[1] == 1:
            slices = slices.expand(-1, 3, -1, -1)
        return (slices - self.mean.to(slices.dtype)) / self.std.to(slices.dtype)

    def _axis_loss(self, pred: torch.Tensor, target: torch.Tensor, axis: int) -> torch.Tensor:
        """Loss on slices normal to spatial ``axis`` (2, 3 or 4 of ``[B, C, D, H, W]``)."""
        others = [a for a in (2, 3, 4) if a != axis]
        perm = (0, axis, 1, *others)
        c = pred.shape[1]

        def slices(x: torch.Tensor) -> torch.Tensor:
            x = x.permute(*perm)
            return x.reshape(-1, c, x.shape[3], x.shape[4])

        p, t = slices(pred), slices(target)
        n = p.shape[0]
        if self.slice_ratio < 1.0:
            keep = max(1, int(self.slice_ratio * n))
            index = torch.randperm(n)[:keep].to(p.device)
            p, t = p.index_select(0, index), t.index_select(0, index)
        fp = self.vgg(self._to_vgg(p), self.layers)
        with torch.no_grad():
            ft = self.vgg(self._to_vgg(t), self.layers)
        return sum(F.mse_loss(fp[name], ft[name]) for name in self.layers)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the scalar perceptual loss between volumes ``pred`` and ``target`` ``[B, C, D, H, W]``.

        ``C`` must be 1 (repeated to RGB) or 3. Every spatial side must be at least
        ``2**(pools before the deepest layer)`` (8 for ``relu4_3``).
        """
        if pred.shape != target.shape or pred.ndim != 5 or pred.shape[1] not in (1, 3):
            raise ValueError(
                f"PerceptualLoss expects pred and target of one shape [B, 1 or 3, D, H, W], got "
                f"{tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if min(pred.shape[2:]) < self._min_side:
            raise UserError(
                f"perceptual: volume of spatial size {tuple(pred.shape[2:])} is too small for VGG16 layer "
                f"{self._deepest}: every side must be >= {self._min_side}; use a larger data.patch_size "
                f"or shallower layers"
            )
        target = target.detach()
        dims = tuple(range(1, pred.ndim))
        scale = torch.maximum(target.abs().amax(dim=dims), pred.detach().abs().amax(dim=dims))
        scale = scale.clamp_min(torch.finfo(scale.dtype).tiny).view(-1, 1, 1, 1, 1)
        pred, target = pred / scale, target / scale
        losses = [self._axis_loss(pred, target, axis) for axis in (2, 3, 4)]
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return (
            f"weights={self.record['weights']!r} (requested {self.weights!r}), layers={self.layers}, "
            f"slice_ratio={self.slice_ratio}"
        )


@hookimpl
def ldt_register_losses(register: Register) -> None:
    register("perceptual", PerceptualLoss)
