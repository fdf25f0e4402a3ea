"""Sliding-window inference reconstructs volumes exactly and matches full-volume convolution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowdose_toolkit.errors import UserError
from lowdose_toolkit.infer.sliding import infer_volume, parse_overlap

BLENDINGS = ["hann", "average", "crop"]


def _volume(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("blending", BLENDINGS)
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [
        ((1, 40, 37, 50), 16, 4),  # dimensions not multiples of the patch
        ((1, 33, 21, 19), (12, 10, 8), (4, 2, 6)),  # anisotropic patch and overlap
        ((1, 24, 24, 24), 12, 0.5),  # overlap as a fraction
        ((1, 17, 18, 19), 16, 0),  # no overlap
    ],
)
def test_identity_and_scaling_are_exact(shape, patch, overlap, blending) -> None:
    vol = _volume(*shape)
    out = infer_volume(vol, lambda x: x, patch, overlap, batch_size=4, blending=blending)
    assert out.shape == vol.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, vol, atol=1e-6, rtol=1e-6)
    doubled = infer_volume(vol, lambda x: 2 * x, patch, overlap, batch_size=3, blending=blending)
    torch.testing.assert_close(doubled, 2 * vol, atol=2e-6, rtol=1e-6)


@pytest.mark.parametrize("blending", BLENDINGS)
def test_volume_smaller_than_patch_is_padded_and_cropped(blending) -> None:
    vol = _volume(1, 5, 30, 3, seed=1)  # two axes shorter than the patch, one longer
    seen: list[tuple[int, ...]] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x + 1

    out = infer_volume(vol, predict, patch_size=8, overlap=2, batch_size=2, blending=blending)
    assert out.shape == (1, 5, 30, 3)
    torch.testing.assert_close(out, vol + 1, atol=1e-6, rtol=1e-6)
    assert all(s[2:] == (8, 8, 8) for s in seen)


@pytest.mark.parametrize("batch_size", [1, 2, 5, 1000])
def test_batch_sizes_and_progress(batch_size) -> None:
    vol = _volume(2, 20, 22, 18, seed=2)  # two input channels, one output channel
    calls: list[tuple[int, int]] = []
    sizes: list[int] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return x[:, :1] - x[:, 1:]

    out = infer_volume(
        vol, predict, 10, 2, batch_size=batch_size, progress=lambda done, total: calls.append((done, total))
    )
    torch.testing.assert_close(out, vol[:1] - vol[1:], atol=1e-6, rtol=1e-6)
    total = calls[-1][1]
    assert calls[-1][0] == total == sum(sizes) == 18  # 3 x 3 x 2 patches
    assert max(sizes) == min(batch_size, total)


def test_rich_progress_task_is_advanced() -> None:
    from rich.progress import Progress

    vol = _volume(1, 20, 20, 20, seed=3)
    with Progress(disable=True) as progress:
        task = progress.add_task("infer", total=None)
        infer_volume(vol, lambda x: x, 12, 4, batch_size=3, progress=(progress, task))
        assert progress.tasks[0].completed == progress.tasks[0].total == 8
        infer_volume(vol, lambda x: x, 12, 4, batch_size=3, progress=progress)
        assert progress.tasks[1].completed == 8


def _conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 1, 3, padding=1))
    return net.eval()


def test_convolution_matches_full_volume() -> None:
    """Two 3x3x3 convolutions see 2 voxels each side: an overlap of 4 makes crop blending exact."""
    net = _conv_net()
    vol = _volume(1, 30, 27, 25, seed=4)
    with torch.inference_mode():
        full = net(vol[None])[0]
    crop = infer_volume(vol, net, patch_size=12, overlap=4, batch_size=4, blending="crop")
    torch.testing.assert_close(crop, full, atol=1e-5, rtol=1e-5)

    # Hann and average blend in patch-edge predictions; Hann weights them down, so it stays close to the
    # full-volume result and much closer than tiling without overlap.
    tiled = infer_volume(vol, net, patch_size=12, overlap=0, batch_size=4, blending="crop")
    hann = infer_volume(vol, net, patch_size=12, overlap=6, batch_size=4, blending="hann")
    average = infer_volume(vol, net, patch_size=12, overlap=6, batch_size=4, blending="average")
    err_tiled = (tiled - full).abs().mean()
    err_hann = (hann - full).abs().mean()
    err_average = (average - full).abs().mean()
    assert err_hann < 0.5 * err_average < err_tiled
    # Where only one patch reaches (the volume's corner), every mode reproduces the full result.
    torch.testing.assert_close(hann[:, :3, :3, :3], full[:, :3, :3, :3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("amp", "dtype", "tol"), [(False, torch.float32, 1e-6), ("fp32", torch.float32, 1e-6),
                                                    ("bf16", torch.bfloat16, 3e-2), (True, torch.bfloat16, 3e-2),
                                                    ("fp16", torch.float16, 3e-3)])
def test_precision_is_honoured_on_cpu(amp, dtype: torch.dtype, tol: float) -> None:
    """bf16 and fp16 autocast the network on the CPU too; the blended output is float32 and close to fp32."""
    net = _conv_net(1)
    vol = _volume(1, 14, 14, 14, seed=5)
    seen: list[torch.dtype] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        y = net(x)
        seen.append(y.dtype)
        return y

    out = infer_volume(vol, predict, 14, 0, batch_size=1, device=torch.device("cpu"), amp=amp)
    with torch.inference_mode():
        full = net(vol[None])[0]
    assert seen == [dtype] and out.dtype == torch.float32
    torch.testing.assert_close(out, full, atol=tol, rtol=tol)
    with pytest.raises(UserError, match="'fp8'"):
        infer_volume(vol, net, 14, 0, batch_size=1, amp="fp8")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_with_autocast(amp) -> None:
    net = _conv_net(2).cuda()
    vol = _volume(1, 40, 33, 29, seed=6)
    seen: list[torch.dtype] = []

    def predict(x: torch.Tensor) -> torch.Tensor:
        assert x.is_cuda
        y = net(x)
        seen.append(y.dtype)
        return y

    out = infer_volume(vol, predict, 16, 4, batch_size=4, blending="crop", device="cuda", amp=amp)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    expected_dtype = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    assert set(seen) == {expected_dtype}
    with torch.inference_mode():
        full = net.cpu()(vol[None])[0]
    tol = 1e-3 if amp == "none" else 5e-2  # cuDNN may use TF32 for float32 convolutions
    torch.testing.assert_close(out, full, atol=tol, rtol=tol)


def test_overlap_parsing_and_errors() -> None:
    assert parse_overlap(0.5, (16, 12, 7)) == (8, 6, 4)
    assert parse_overlap(0.99, (4, 4, 1)) == (2, 2, 0)
    assert parse_overlap(4.0, (8, 8, 8)) == (4, 4, 4)  # a CLI float that is a whole number: voxels
    vol = _volume(1, 10, 10, 10)
    with pytest.raises(UserError, match=r"overlap \(3, 3, 3\).*even"):
        infer_volume(vol, lambda x: x, 8, 3, batch_size=1)
    with pytest.raises(UserError, match=r"overlap \(8, 8, 8\)"):
        infer_volume(vol, lambda x: x, 8, 8, batch_size=1)
    with pytest.raises(UserError, match="patch_size"):
        infer_volume(vol, lambda x: x, (8, 8), 0, batch_size=1)
    with pytest.raises(UserError, match="'gauss'"):
        infer_volume(vol, lambda x: x, 8, 0, batch_size=1, blending="gauss")  # type: ignore[arg-type]
    with pytest.raises(UserError, match=r"\[C, D, H, W\]"):
        infer_volume(vol[0], lambda x: x, 8, 0, batch_size=1)
    with pytest.raises(UserError, match=r"got \(1, 1, 4, 8, 8\)"):
        infer_volume(vol, lambda x: x[:, :, :4], 8, 0, batch_size=1)


@pytest.mark.parametrize("blending", BLENDINGS)
@pytest.mark.parametrize(
    ("shape", "patch", "overlap"),
    [((2, 40, 37, 50), (16, 16, 16), (4, 4, 4)), ((1, 33, 21, 19), (12, 10, 8), (4, 2, 6))],
)
def test_blender_matches_torchio_grid_aggregator(shape, patch, overlap, blending) -> None:
    """The one-buffer blender gives TorchIO's GridAggregator result for a position-dependent predictor."""
    import torchio as tio

    vol = _volume(*shape, seed=4)
    torch.manual_seed(0)
    net = nn.Conv3d(shape[0], 3, 3, padding=1)  # border effects differ per patch: blending matters

    def predict(x: torch.Tensor) -> torch.Tensor:
        return net(x)

    ours = infer_volume(vol, predict, patch, overlap, batch_size=3, blending=blending)
    sampler = tio.GridSampler(tio.Subject(image=tio.ScalarImage(tensor=vol)), patch_size=patch, patch_overlap=overlap)
    aggregator = tio.GridAggregator(sampler, overlap_mode=blending)
    locations = torch.as_tensor(sampler.locations, dtype=torch.int64)
    with torch.inference_mode():
        for start in range(0, len(locations), 3):
            locs = locations[start : start + 3]
            batch = torch.stack([vol[:, a:d, b:e, c:f] for a, b, c, d, e, f in locs.tolist()])
            aggregator.add_batch(net(batch), locs)
    expected = aggregator.get_output_tensor()
    assert ours.shape == expected.shape == (3, *shape[1:])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    if blending != "crop":  # patches disagree near their borders, so the blend is not any single patch
        assert not torch.allclose(ours, net(vol[None])[0].detach(), atol=1e-4)


@pytest.mark.parametrize("blending", ["hann", "average"])
def test_blender_weighting_on_the_device_path_matches_the_host_path(blending) -> None:
    """The accelerator path (weights applied before the copy to the host) equals the CPU path."""
    from lowdose_toolkit.infer.sliding import Blender

    vol = _volume(2, 21, 18, 25, seed=5)
    patch, overlap = (8, 8, 8), (2, 4, 6)
    locations = torch.tensor([[a, b, c, a + 8, b + 8, c + 8] for a in (0, 6, 12, 13) for b in (0, 4, 8, 10)
                              for c in (0, 2, 4, 6, 8, 10, 12, 14, 16, 17)])  # fmt: skip
    results = []
    for on_device in (False, True):
        blender = Blender((21, 18, 25), patch, overlap, locations, blending, torch.device("cpu"))
        blender.weigh_on_device = on_device
        for start in range(0, len(locations), 7):
            locs = locations[start : start + 7].tolist()
            blender.add(torch.stack([vol[:, a:d, b:e, c:f] * (1 + a) for a, b, c, d, e, f in locs]), locs)
        results.append(blender.result())
    torch.testing.assert_close(results[0], results[1], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(results[0], vol, atol=1e-3)  # the (1 + a) factor makes patches disagree
