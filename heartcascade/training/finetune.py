"""Fine-tuning: start a training run from a trained model's weights (``hc_train --pretrained MODEL``).

Why: a model trained elsewhere fails most on another centre's scans, and a few of that centre's labelled
scans adapt it in minutes. The run keeps its own plans (its dataset's preprocessing, patch sizes and
schedule); only the networks start from the model, so the two must agree on what the weights mean:
modality, image channels, classes (names and order), intensity normalisation and every architecture
field of the networks. Anything else differing is fine (spacings, patch sizes, the schedule).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from torch import nn

from heartcascade.inference.model_loading import LoadedFold
from heartcascade.planning import plans as P
from heartcascade.utils.errors import HCError

#: Network constructor arguments that do not change what the weights compute at inference.
_TRAINING_ONLY = ("dropout",)


def _architecture(configuration: str, plans: "P.Plans") -> dict[str, Any]:
    if configuration == "cascade":
        fields = {f"net1.{k}": v for k, v in P.net1_kwargs(plans).items()}
        fields.update({f"net2.{k}": v for k, v in P.net2_kwargs(plans).items()})
        fields.update({f"cascade.{k}": v for k, v in P.cascade_kwargs(plans).items()})
    else:
        fields = {f"baseline_unet.{k}": v for k, v in P.baseline_kwargs(plans).items()}
    return {k: v for k, v in fields.items() if not any(t in k for t in _TRAINING_ONLY)}


def _normalisation(plans: "P.Plans") -> list[tuple[Any, Any]]:
    return [(n.scheme, _plain(n.target_range)) for n in plans.normalization]


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def check_finetune_compatible(pretrained: "P.Plans", plans: "P.Plans", configuration: str,
                              source: str | Path) -> None:
    """Raise one HCError naming the first field where the model's plans and the run's plans differ in a
    way the weights cannot follow."""
    def differ(what: str, theirs: Any, ours: Any) -> HCError:
        return HCError(f"--pretrained {source}: {what} differs (model: {theirs}, this dataset's plans: {ours}); "
                       "fine-tuning needs the same modality, channels, classes and network architecture"
                       + (" (align the architecture with --plans-override)" if "." in what else ""))

    theirs_p, ours_p = pretrained, plans
    for key in ("modality", "num_input_channels", "num_classes"):
        if str(getattr(theirs_p, key)).lower() != str(getattr(ours_p, key)).lower():
            raise differ(key, getattr(theirs_p, key), getattr(ours_p, key))
    theirs_labels = sorted((int(v), k) for k, v in theirs_p.labels.items())
    ours_labels = sorted((int(v), k) for k, v in ours_p.labels.items())
    if theirs_labels != ours_labels:
        raise differ("labels", dict((k, v) for v, k in theirs_labels), dict((k, v) for v, k in ours_labels))
    if _normalisation(theirs_p) != _normalisation(ours_p):
        raise differ("intensity normalisation", _normalisation(theirs_p), _normalisation(ours_p))
    theirs, ours = _architecture(configuration, pretrained), _architecture(configuration, plans)
    for key in sorted(set(theirs) | set(ours)):
        if _plain(theirs.get(key)) != _plain(ours.get(key)):
            raise differ(key, theirs.get(key), ours.get(key))


def initialise_from(networks: Mapping[str, nn.Module], model: LoadedFold, plans: "P.Plans",
                    configuration: str, source: str | Path) -> None:
    """Copy the model's weights into the run's freshly built networks after checking compatibility."""
    if model.configuration != configuration:
        raise HCError(f"--pretrained {source}: a '{model.configuration}' model cannot start a '{configuration}' "
                      f"run (pass -c {model.configuration})")
    check_finetune_compatible(model.plans, plans, configuration, source)
    for key, net in networks.items():
        state = model.networks[key].state_dict()
        mine = net.state_dict()
        for name, tensor in mine.items():
            if name not in state or tuple(state[name].shape) != tuple(tensor.shape):
                shape = tuple(state[name].shape) if name in state else "missing"
                raise HCError(f"--pretrained {source}: weights {key}.{name} do not fit ({shape} vs "
                              f"{tuple(tensor.shape)})")
        net.load_state_dict(state)
