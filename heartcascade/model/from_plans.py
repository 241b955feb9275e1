"""Build the networks from the plans -- the one place where plans become modules.

Training and inference both call these functions, so a checkpoint's ``networks`` state dicts always fit
the modules rebuilt from its ``plans`` (documentation/conventions.md, "Trained model folders").

The plans' field layout is spelled out once, in :mod:`heartcascade.planning.plans` (``net1_kwargs``,
``net2_kwargs``, ``cascade_kwargs``, ``baseline_kwargs``; sections ``net1``, ``net2``,
``baseline_unet``; see documentation/plans.md); this module turns those into modules and checks that
Net2's input channels match its input mode.
"""
from __future__ import annotations

from typing import Any, Mapping

from heartcascade.networks.baseline_unet import BaselineUNet3D
from heartcascade.networks.cascade import Cascade
from heartcascade.networks.net1 import Net1
from heartcascade.networks.net2 import Net2, net2_input_channels
from heartcascade.planning import plans as P
from heartcascade.utils.errors import HCError


def _int(plans: Mapping[str, Any], key: str) -> int:
    if key not in plans:
        raise HCError(f"plans: missing '{key}'")
    try:
        return int(plans[key])
    except (TypeError, ValueError):
        raise HCError(f"plans: '{key}' must be an integer, got {plans[key]!r}") from None


def num_classes(plans: Mapping[str, Any]) -> int:
    return _int(plans, "num_classes")


def image_channels(plans: Mapping[str, Any]) -> int:
    return _int(plans, "num_input_channels")


def net2_input_mode(plans: Mapping[str, Any]) -> str:
    """The Cascade's name of the plans' Net2 input mode ('probs' or 'label')."""
    return P.cascade_kwargs(dict(plans))["input_mode"]


def build_net1(plans: Mapping[str, Any]) -> Net1:
    kw = P.net1_kwargs(dict(plans))
    kw["dilations"] = [d if isinstance(d, int) else tuple(d) for d in kw["dilations"]]
    return Net1(**kw)


def build_net2(plans: Mapping[str, Any]) -> Net2:
    kw = P.net2_kwargs(dict(plans))
    want = net2_input_channels(net2_input_mode(plans), num_classes(plans), image_channels(plans))
    if kw["in_channels"] != want:
        raise HCError(f"plans: net2.in_channels is {kw['in_channels']} but input_mode "
                      f"{plans['net2'].get('input_mode')!r} with {image_channels(plans)} image channel(s) and "
                      f"{num_classes(plans)} classes needs {want}")
    return Net2(**kw)


def build_cascade(plans: Mapping[str, Any], net1: Net1 | None = None, net2: Net2 | None = None) -> Cascade:
    """Net1 + Net2 as one module (existing sub-networks may be passed in, e.g. loaded ones).

    No default scale factors: they are per case (``properties['coarse_scale_factors']``) and are
    passed to ``forward`` / ``run_net1``.
    """
    return Cascade(net1 if net1 is not None else build_net1(plans),
                   net2 if net2 is not None else build_net2(plans), **P.cascade_kwargs(dict(plans)))


def build_baseline(plans: Mapping[str, Any]) -> BaselineUNet3D:
    return BaselineUNet3D(**P.baseline_kwargs(dict(plans)))


def build_networks(configuration: str, plans: Mapping[str, Any]) -> dict[str, Any]:
    """``{"net1", "net2"}`` for ``"cascade"``, ``{"baseline"}`` for ``"baseline"`` (checkpoint keys)."""
    if configuration == "cascade":
        return {"net1": build_net1(plans), "net2": build_net2(plans)}
    if configuration == "baseline":
        return {"baseline": build_baseline(plans)}
    raise HCError(f"unknown configuration {configuration!r}; expected 'cascade' or 'baseline'")
