"""Tests for heartcascade.networks: shapes, the 23-layer count, Net2's z-equivariance, freezing,
bf16 autocast and a tiny overfit. Widths and volumes are tiny so the file runs in seconds."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from heartcascade.losses.terms import total_loss
from heartcascade.networks import (
    DEFAULT_DILATIONS,
    BaselineUNet3D,
    Cascade,
    Net1,
    Net2,
    coarse_shape_for,
    count_conv_layers,
    crop_to_shape,
    downsample_labels,
    net2_input_channels,
    pad_to_multiple,
    z_budget,
)
from heartcascade.utils.errors import HCError

C = 3  # classes in the tiny tests


def tiny_net1(in_channels: int = 1, **kw) -> Net1:
    return Net1(in_channels, C, base_features=4, max_features=16, **kw)


def tiny_net2(in_channels: int, K: int, **kw) -> Net2:
    kw.setdefault("num_levels", 2)
    kw.setdefault("recursions", 2)
    return Net2(in_channels, C, K, base_features=4, max_features=16, **kw)


def tiny_cascade(K: int = 3, mode: str = "probabilities") -> Cascade:
    return Cascade(
        tiny_net1(), tiny_net2(net2_input_channels(mode, C, 1), K), input_mode=mode,
        scale_factors=(0.5, 0.25, 0.25),
    )


def net2_loss(logits: torch.Tensor, target: torch.Tensor, roi: bool = True) -> torch.Tensor:
    """The curriculum's Net2 loss from the loss table: L2 (+ L2_ROI)."""
    return total_loss(["L2", "L2_ROI"] if roi else ["L2"], {}, {"net2": (logits, target)}, "inverse_count")[0]


# --------------------------------------------------------------------------------------------- Net1
def test_net1_has_23_conv_layers_default_and_tiny() -> None:
    assert count_conv_layers(Net1(1, 8)) == 23
    assert count_conv_layers(tiny_net1()) == 23


def test_net1_kernels_dilations_and_padding_follow_schedule() -> None:
    net = tiny_net1(dilations=(1, 2, 3, 4))
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d) and m.kernel_size == (5, 5, 5)]
    assert len(convs) == 18  # 8 contracting + 2 bottleneck + 8 expansive
    dil = [m.dilation[0] for m in convs]
    assert dil == [1, 1, 2, 2, 3, 3, 4, 4, 1, 1, 4, 4, 3, 3, 2, 2, 1, 1]  # mirrored in the expansive path
    assert all(m.padding[0] == 2 * m.dilation[0] for m in convs)
    assert len(DEFAULT_DILATIONS) == 4 and list(DEFAULT_DILATIONS) == sorted(DEFAULT_DILATIONS)


def test_net1_anisotropic_shape_with_padding_helper() -> None:
    net = tiny_net1().eval()
    x = torch.randn(2, 1, 11, 32, 48)
    padded = pad_to_multiple(x, net.required_divisor)
    assert padded.shape[2:] == (16, 32, 48)
    assert torch.equal(padded[:, :, :11], x) and padded[:, :, 11:].abs().sum() == 0
    out = crop_to_shape(net(padded), x.shape[2:])
    assert out.shape == (2, C, 11, 32, 48)
    with pytest.raises(HCError):
        net(x)


def test_pad_to_multiple_per_axis() -> None:
    x = torch.randn(1, 2, 5, 6, 7)
    y = pad_to_multiple(x, (1, 4, 8))
    assert y.shape[2:] == (5, 8, 8)
    assert pad_to_multiple(y, (1, 4, 8)) is y


# --------------------------------------------------------------------------------------------- Net2
@pytest.mark.parametrize(
    "K, n_convs, kernels, slicewise",
    [
        (1, 4, [1, 1, 1, 1], 1),
        (3, 6, [3, 1, 1, 1, 1, 1], 1),
        (9, 6, [3, 3, 3, 3, 1, 1], 1),
        (21, 6, [3, 3, 3, 3, 3, 3], 9),
    ],
)
def test_z_budget_rule(K: int, n_convs: int, kernels: list[int], slicewise: int) -> None:
    assert z_budget(K, n_convs) == (kernels, slicewise)


def test_z_budget_rejects_even_K() -> None:
    with pytest.raises(HCError):
        z_budget(4, 6)


@pytest.mark.parametrize("K", [3, 9, 21])
def test_net2_never_pads_z_and_consumes_exactly_K_minus_1(K: int) -> None:
    net = tiny_net2(2, K)
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert all(m.padding[0] == 0 for m in convs)
    consumed = sum(m.kernel_size[0] - 1 for m in convs if isinstance(m, nn.Conv3d))
    assert consumed == K - 1
    assert not any(isinstance(m, (nn.BatchNorm3d, nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm))
                   for m in net.modules())


def test_net2_anisotropic_shape() -> None:
    net = tiny_net2(2, 3)
    x = torch.randn(2, 2, 11, 32, 48)
    out = net(x)
    assert out.shape == (2, C, net.output_depth(11), 32, 48) == (2, C, 9, 32, 48)
    assert net.required_divisor == 4
    with pytest.raises(HCError):
        net(torch.randn(1, 2, 2, 32, 48))  # fewer slices than K
    with pytest.raises(HCError):
        net(torch.randn(1, 2, 3, 30, 48))  # in-plane not divisible by 4


@pytest.mark.parametrize("K", [3, 9])
def test_net2_is_equivariant_along_z(K: int) -> None:
    torch.manual_seed(0)
    net = tiny_net2(2, K, dropout=0.1).double().eval()
    D = K + 4
    x = torch.randn(1, 2, D, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        stack = net(x)
        assert stack.shape[2] == D - K + 1
        for j in range(D - K + 1):
            window = net(x[:, :, j:j + K])
            assert window.shape[2] == 1
            torch.testing.assert_close(stack[:, :, j:j + 1], window, rtol=1e-9, atol=1e-9)
        # the same holds in float32 up to rounding (different conv algorithms per input depth)
        net32, x32 = net.float(), x.float()
        stack32 = net32(x32)
        for j in range(D - K + 1):
            torch.testing.assert_close(stack32[:, :, j:j + 1], net32(x32[:, :, j:j + K]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ Cascade
@pytest.mark.parametrize("mode", ["probabilities", "labelmap"])
def test_cascade_shapes(mode: str) -> None:
    torch.manual_seed(0)
    casc = tiny_cascade(K=3, mode=mode)
    out = casc(torch.randn(2, 1, 11, 32, 48))
    assert out.coarse_shape == coarse_shape_for((11, 32, 48), (0.5, 0.25, 0.25)) == (6, 8, 12)
    assert out.padded_coarse_shape == (16, 16, 16)
    assert out.net1_logits.shape == (2, C, 6, 8, 12)
    assert out.net1_probs.shape == (2, C, 11, 32, 48)
    torch.testing.assert_close(out.net1_probs.sum(1), torch.ones(2, 11, 32, 48))
    assert out.net2_logits.shape == (2, C, 9, 32, 48)
    labels = torch.randint(0, C, (2, 11, 32, 48))
    assert downsample_labels(labels, out.coarse_shape).shape == (2, 6, 8, 12)


def test_cascade_rejects_mismatched_channels() -> None:
    with pytest.raises(HCError):
        Cascade(tiny_net1(), tiny_net2(2, 3), input_mode="probabilities")


def _grads(module: nn.Module) -> list:
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize("net1_on, net2_on", [(True, True), (False, True), (True, False)])
def test_cascade_freezing(net1_on: bool, net2_on: bool) -> None:
    torch.manual_seed(0)
    casc = tiny_cascade(K=3)
    casc.set_trainable(net1=net1_on, net2=net2_on)
    casc.train()
    assert casc.net1.training == net1_on and casc.net2.training == net2_on
    x = torch.randn(1, 1, 5, 16, 16)
    target = torch.randint(0, C, (1, 3, 16, 16))
    out = casc(x)
    assert out.net1_logits.requires_grad == net1_on
    net2_loss(out.net2_logits, target).backward()
    for flag, net in ((net1_on, casc.net1), (net2_on, casc.net2)):
        grads = _grads(net)
        if flag:
            assert all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        else:
            assert all(g is None for g in grads)


def test_cascade_bf16_autocast_cpu() -> None:
    torch.manual_seed(0)
    casc = tiny_cascade(K=3)
    x = torch.randn(1, 1, 7, 32, 32)
    target = torch.randint(0, C, (1, 5, 32, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = casc(x)
        loss = net2_loss(out.net2_logits, target)
    assert out.net2_logits.shape == (1, C, 5, 32, 32)
    assert torch.isfinite(out.net2_logits.float()).all() and torch.isfinite(out.net1_logits.float()).all()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in casc.parameters() if p.grad is not None)


# ----------------------------------------------------------------------------------------- Baseline
def test_baseline_unet_shape() -> None:
    net = BaselineUNet3D(1, C, base_features=4, max_features=16)
    x = torch.randn(1, 1, 16, 32, 48)
    assert net(x).shape == (1, C, 16, 32, 48)
    assert net.required_divisor == 16
    with pytest.raises(HCError):
        net(torch.randn(1, 1, 11, 32, 48))


# ------------------------------------------------------------------------------------------ Overfit
def test_net2_overfits_trivial_two_class_pattern() -> None:
    torch.manual_seed(0)
    net = Net2(1, 2, K=3, base_features=8, num_levels=2, recursions=1, max_features=16)
    x = torch.zeros(2, 1, 5, 16, 16)
    x[:, :, :, 4:12, 3:10] = 1.0  # a bright box is the foreground
    x = x + 0.1 * torch.randn_like(x)
    target = (x[:, 0, 1:-1] > 0.5).long()  # labels of the D - K + 1 = 3 centre slices
    loss_fn = lambda logits, target: net2_loss(logits, target, roi=False)  # noqa: E731
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(net(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < 0.2, losses[::10]


def test_instance_norm_passes_single_voxel_maps_and_normalises_larger_ones() -> None:
    from heartcascade.networks.blocks import make_norm

    norm = make_norm("instance", 3).train()
    one = torch.randn(2, 3, 1, 1, 1)
    assert torch.allclose(norm(one), one)  # affine starts as identity; no statistics for one voxel
    big = torch.randn(2, 3, 4, 4, 4) * 5 + 3
    out = norm(big)
    assert out.mean(dim=(2, 3, 4)).abs().max() < 1e-4
    assert torch.allclose(out.var(dim=(2, 3, 4), unbiased=False), torch.ones(2, 3), atol=1e-3)
    # a normalised Net1 trains on a subvolume whose bottleneck is a single voxel
    net = Net1(1, 3, base_features=2, max_features=8, kernel_size=3, norm="instance")
    net(torch.randn(2, 1, 16, 16, 16)).mean().backward()


def test_resolving_a_device_flushes_subnormals_in_every_cpu_thread():
    """Subnormal activations of trained networks made CPU iterations 17x slower (benchmarks.md, "Subnormal
    numbers"): resolving the device switches them off before torch starts its threads, so the parallel
    kernels (here a 4-million-element product on 2 threads) treat them as zero as well as the main thread."""
    import subprocess
    import sys

    code = ("import torch\n"
            "from heartcascade.utils.device import resolve_device\n"
            "resolve_device('cpu'); torch.set_num_threads(2)\n"
            "x = torch.full((1 << 22,), 1e-39)\n"
            "print(int((x * 1.0).count_nonzero()), float(torch.tensor([1e-39]) * 1.0))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0.0"], out
