"""ML-Net's proxy classification head (CG-3DSRGAN paper, Sec. II.A).

"The classification head is made of multi-layer perceptron": it reads an encoder feature shared
with the reconstruction network (the recipe names it, normally ``bottleneck``), pools it globally
over space and predicts the dose reduction factor (DRF) class as logits. The paper gives no widths;
one hidden layer of 128 units with ReLU is our default.
"""

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register

POOLS = {"avg": ("avg",), "max": ("max",), "std": ("std",), "avgmax": ("avg", "max"), "avgstd": ("avg", "std")}


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` on the way back."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None  # type: ignore[attr-defined]


class DoseClassifier(nn.Module):
    """Global pooling + MLP predicting DRF class logits from a generator feature (paper Sec. II.A).

    Args:
        in_channels: Channels of the feature it reads (context argument).
        num_classes: Number of DRF classes (context argument: the recipe's DRF count).
        hidden: Widths of the hidden layers (Linear → ReLU → Dropout each); ``[]`` is a linear probe.
        dropout: Dropout probability after each hidden layer.
        pool: Global pooling over ``D, H, W`` per channel: ``avg``, ``max``, ``std`` (spatial standard
            deviation: a texture/noise-energy statistic), or two concatenated: ``avgmax``, ``avgstd``.
        encoder_grad: Scale of the gradient the head sends back into the generator's shared encoder:
            1 trains both jointly (the paper), 0 makes the head a probe that does not guide the encoder,
            values between weaken the guidance without slowing the head's own learning.

    Example:
        >>> head = DoseClassifier(in_channels=16, num_classes=5)
        >>> head(torch.rand(2, 16, 3, 3, 4)).shape
        torch.Size([2, 5])
    """

    #: Small arguments for conformance checks (lowdose_toolkit.testing).
    example_args: ClassVar[dict[str, Any]] = {"hidden": [8]}

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: list[int] = [128],  # noqa: B006 (copied below, never mutated)
        dropout: float = 0.0,
        pool: Literal["avg", "max", "std", "avgmax", "avgstd"] = "avg",
        encoder_grad: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= encoder_grad:
            raise UserError(f"dose_classifier: encoder_grad={encoder_grad} must be >= 0 (1 = the paper, 0 = a probe)")
        if num_classes < 2:
            raise UserError(f"dose_classifier: num_classes={num_classes}; list at least two DRFs in data.drfs")
        if pool not in POOLS:
            raise UserError(f"dose_classifier: pool={pool!r} must be one of {', '.join(map(repr, POOLS))}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dose_classifier: dropout={dropout} must be in [0, 1)")
        if any(h < 1 for h in hidden):
            raise UserError(f"dose_classifier: hidden={hidden} widths must be positive")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = list(hidden)
        self.dropout = dropout
        self.pool = pool
        self.encoder_grad = encoder_grad
        layers: list[nn.Module] = []
        width = len(POOLS[pool]) * in_channels
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        """Map a feature ``[B, in_channels, D, H, W]`` to logits ``[B, num_classes]``."""
        if feature.ndim < 3 or feature.shape[1] != self.in_channels:
            raise ValueError(f"DoseClassifier expects [B, {self.in_channels}, ...], got shape {tuple(feature.shape)}")
        if self.encoder_grad == 0.0:
            feature = feature.detach()
        elif self.encoder_grad != 1.0:
            feature = _ScaleGrad.apply(feature, self.encoder_grad)
        flat = feature.flatten(2).float()  # statistics in fp32 also under autocast
        stats = {
            "avg": lambda: flat.mean(dim=2),
            "max": lambda: flat.amax(dim=2),
            "std": lambda: flat.std(dim=2, correction=0),
        }
        pooled = torch.cat([stats[name]() for name in POOLS[self.pool]], dim=1)
        return self.mlp(pooled.to(feature.dtype))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, num_classes={self.num_classes}, hidden={self.hidden}, "
            f"dropout={self.dropout}, pool={self.pool!r}, encoder_grad={self.encoder_grad}"
        )


@hookimpl
def ldt_register_heads(register: Register) -> None:
    register("dose_classifier", DoseClassifier)
