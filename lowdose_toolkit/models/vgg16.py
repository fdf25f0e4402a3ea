"""VGG16's convolutional trunk in plain PyTorch, loadable from torchvision's weight file.

``VGG16Features().features`` is laid out exactly as torchvision's ``vgg16().features`` (Simonyan &
Zisserman 2015, configuration D), so the state-dict keys ``features.0.weight`` … ``features.28.bias``
of torchvision's ``vgg16-397923af.pth`` load as they are; its ``classifier.*`` keys are ignored.
torchvision itself is never imported and nothing is ever downloaded: the file is looked up in
``path``, then ``$LDT_VGG16_WEIGHTS``, then torch hub's cache, and a missing file is a
:class:`~lowdose_toolkit.errors.UserError` that says where to get it and where to put it.

Making a file in torchvision's format (tests do this; the weights are random)::

    from lowdose_toolkit.models.vgg16 import save_vgg16_features
    save_vgg16_features(tmp_path / "vgg16.pth", seed=1)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from lowdose_toolkit.errors import UserError

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILENAME = "vgg16-397923af.pth"
ENV_VAR = "LDT_VGG16_WEIGHTS"

# torchvision's cfgs["D"]: conv widths, "M" = 2×2 max-pool.
_CFG: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _layer_names() -> dict[str, int]:
    """Map ``conv1_1``, ``relu1_1``, …, ``pool5`` to their index in ``features``."""
    names: dict[str, int] = {}
    index, block, conv = 0, 1, 1
    for v in _CFG:
        if v == "M":
            names[f"pool{block}"] = index
            index, block, conv = index + 1, block + 1, 1
        else:
            names[f"conv{block}_{conv}"] = index
            names[f"relu{block}_{conv}"] = index + 1
            index, conv = index + 2, conv + 1
    return names


LAYERS: dict[str, int] = _layer_names()
"""Layer name → index in ``VGG16Features.features`` (e.g. ``relu4_3`` → 22)."""


class VGG16Features(nn.Module):
    """The 31 layers of torchvision's ``vgg16().features``, always frozen and in eval mode.

    Constructing it does not touch PyTorch's global random state: the random initialisation
    (torchvision's: Kaiming-normal, fan-out, zero bias) uses its own generator seeded by ``seed``,
    so the same seed always gives the same "random features".

    Args:
        seed: Seed of the random initialisation (replaced when weights are loaded).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        with torch.random.fork_rng(devices=[]):  # nn.Conv2d's own init must not consume global RNG
            for v in _CFG:
                if v == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU()]
                    channels = int(v)
        self.features = nn.Sequential(*layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for m in self.features:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
                    nn.init.zeros_(m.bias)
        self.seed = seed
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VGG16Features:
        """Stay in eval mode whatever the parent module asks (the loss network is fixed)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Run ``x`` ``[N, 3, H, W]`` up to the deepest of ``layers`` and return their activations."""
        wanted = {LAYERS[name]: name for name in layers}
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.features[: max(wanted) + 1]):
            x = layer(x)
            if i in wanted:
                out[wanted[i]] = x
        return out


def hub_weights_path() -> Path:
    """Where torch hub (and so torchvision) caches the file: ``torch.hub.get_dir()/checkpoints/…``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME


def how_to_get_weights() -> str:
    """One line telling the user how to provide torchvision's VGG16 ImageNet weights."""
    return (
        f"on a machine with internet download {VGG16_URL} and put it at {hub_weights_path()}, "
        f"or set {ENV_VAR}=/path/to/{VGG16_FILENAME} or the perceptual loss's path: key, "
        f"or use the perceptual loss's weights: none for fixed random features"
    )


def find_vgg16_weights(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Locate the weight file: ``path``, else ``$LDT_VGG16_WEIGHTS``, else the torch hub cache.

    Returns:
        The file, or ``None`` if neither ``path`` nor the variable is set and the hub cache lacks it.

    Raises:
        UserError: ``path`` or ``$LDT_VGG16_WEIGHTS`` is set but names no file (a typo is not
            silently replaced by another file).
    """
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"VGG16 weights file {p} (perceptual loss path: key) not found; {how_to_get_weights()}")
        return p
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise UserError(f"VGG16 weights file {p} (from ${ENV_VAR}) not found; {how_to_get_weights()}")
        return p
    hub = hub_weights_path()
    return hub if hub.is_file() else None


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_vgg16_features(path: str | os.PathLike[str]) -> VGG16Features:
    """Build :class:`VGG16Features` with the weights of a torchvision-format file.

    The file is read with ``torch.load(..., weights_only=True)`` (no arbitrary code runs). Its
    ``features.*`` keys must all be present with torchvision's shapes; other keys are ignored.

    Raises:
        UserError: The file cannot be read as a state dict or does not hold VGG16's features.
    """
    path = Path(path)
    hint = f"expected torchvision's {VGG16_FILENAME} from {VGG16_URL}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure means "not a usable weights file"
        from lowdose_toolkit.core.safeload import load_failure

        raise UserError(f"VGG16 weights file {path} cannot be read by torch.load ({load_failure(e)}); {hint}") from e
    if not isinstance(state, dict):
        raise UserError(f"VGG16 weights file {path} holds a {type(state).__name__}, not a state dict; {hint}")
    net = VGG16Features()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"VGG16 weights file {path} lacks the keys {shown}; {hint}")
    for key, value in expected.items():
        got = state[key]
        if not isinstance(got, torch.Tensor) or got.shape != value.shape:
            got_shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise UserError(
                f"VGG16 weights file {path}: {key} has shape {got_shape}, VGG16 needs {tuple(value.shape)}; {hint}"
            )
    net.load_state_dict({k: state[k] for k in expected})
    return net


def save_vgg16_features(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write randomly initialised VGG16 features as a torchvision-format file (for tests).

    The file holds ``features.0.weight`` … ``features.28.bias`` like ``vgg16-397923af.pth`` (which
    also holds ``classifier.*`` keys; :func:`load_vgg16_features` ignores those).
    """
    path = Path(path)
    torch.save(VGG16Features(seed=seed).state_dict(), path)
    return path
