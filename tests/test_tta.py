"""Test-time views (heartcascade.inference.tta): each view is undone exactly, the quarter turns are the
eight distinct symmetries of the square, and the summed softmax of an equivariant network is its softmax
times the number of views."""
from __future__ import annotations

import torch

from heartcascade.inference.tta import IDENTITY, View, summed_softmax, views


def test_views_enumerate_mirrorings_and_quarter_turns():
    assert views(()) == IDENTITY
    assert views((4, 3)) == (View(()), View((3,)), View((4,)), View((3, 4)))
    assert len(views((2, 3, 4))) == 8
    turns = views((3, 4), quarter_turns=True)
    assert len(turns) == 8 and turns[:4] == views((3, 4))
    x = torch.arange(5 * 5, dtype=torch.float32).reshape(1, 1, 1, 5, 5)
    images = {tuple(v.apply(x).flatten().tolist()) for v in turns}
    assert len(images) == 8  # all eight quarter turns and reflections of a square, none twice
    # the four proper rotations are among them
    for k in range(4):
        assert tuple(torch.rot90(x, k, dims=(3, 4)).flatten().tolist()) in images


def test_every_view_is_undone_exactly_also_on_non_square_slices():
    x = torch.randn(1, 2, 3, 6, 10)
    for v in views((2, 3, 4), quarter_turns=True):
        y = v.apply(x)
        assert y.shape[3:] == ((10, 6) if v.swap_in_plane else (6, 10))
        assert torch.equal(v.undo(y), x)


def test_channels_last_layout_survives_the_in_plane_swap():
    x = torch.randn(1, 2, 3, 6, 10).contiguous(memory_format=torch.channels_last_3d)
    y = View((), True).apply(x)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


class _PointwiseNet(torch.nn.Module):
    """A 1x1x1 convolution: equivariant to every view, so each view's softmax is the same."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_summed_softmax_brings_every_view_back_to_the_input_frame():
    torch.manual_seed(0)
    net = _PointwiseNet()
    x = torch.randn(1, 2, 4, 6, 10)
    with torch.no_grad():
        plain = torch.softmax(net(x), dim=1)
        for quarter in (False, True):
            vs = views((2, 3, 4), quarter_turns=quarter)
            total = summed_softmax(net, x, vs, amp="none", divisor=(1, 4, 4))  # pads 6 -> 8, 10 -> 12 and crops back
            assert total.shape == plain.shape
            assert torch.allclose(total / len(vs), plain, atol=1e-6)
