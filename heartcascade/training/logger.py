"""Training logs: ``training_log.txt``, ``metrics.jsonl`` and ``progress.png``.

The logger keeps its lines and metric records in memory and rewrites the three files atomically on
:meth:`TrainingLogger.flush` (once per epoch and at every checkpoint), so a killed run never leaves a
half-written line. Its state is stored in the checkpoint; resuming restores it, so the files always
describe exactly the work the checkpoint holds (entries written after the last checkpoint of a killed
run are dropped, like the work itself).

metrics.jsonl records (one JSON object per line), all with ``type``, ``step`` and ``global_iteration``:

* ``{"type": "train", "iteration", "loss", "loss_terms": {...}, "lr", "seconds_per_iteration",
  "data_wait_fraction"}`` -- means over one epoch;
* ``{"type": "val", "iteration", "target": "net1"|"cascade"|"baseline", "dice": {name: value},
  "mean_dice", "ema"}``;
* ``{"type": "event", "message"}``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from heartcascade.utils.atomic import atomic_path, atomic_write_text


class TrainingLogger:
    def __init__(self, folder: str | Path, enabled: bool = True, echo: bool = True,
                 class_names: Sequence[str] | None = None) -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self.echo = echo
        self.class_names = list(class_names) if class_names else None
        self.lines: list[str] = []
        self.records: list[dict[str, Any]] = []

    # -- recording -------------------------------------------------------------------------------
    def log(self, message: str, echo: bool | None = None) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}"
        self.lines.append(line)
        if (self.echo if echo is None else echo) and self.enabled:
            tqdm.write(line)

    def record(self, **fields: Any) -> None:
        self.records.append(_clean(fields))

    # -- persistence -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"lines": list(self.lines), "records": json.loads(json.dumps(self.records))}

    def load_state(self, state: dict[str, Any]) -> None:
        self.lines = list(state.get("lines", []))
        self.records = list(state.get("records", []))

    def flush(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / "training_log.txt", "\n".join(self.lines) + ("\n" if self.lines else ""))
        atomic_write_text(self.folder / "metrics.jsonl",
                          "".join(json.dumps(r, sort_keys=False) + "\n" for r in self.records))
        if plot:
            try:
                self.plot(self.folder / "progress.png")
            except Exception as exc:  # a plotting problem must never stop training
                self.log(f"warning: could not draw progress.png ({type(exc).__name__}: {exc})", echo=False)

    def plot(self, path: Path) -> None:
        import matplotlib  # deferred: matplotlib takes ~1.4 s to import and only the plot needs it

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt  # deferred: after matplotlib.use('Agg'), which must come first

        train = [r for r in self.records if r.get("type") == "train"]
        val = [r for r in self.records if r.get("type") == "val"]
        fig, axes = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
        ax = axes[0]
        for step_name in _ordered_unique(r["step"] for r in train):
            pts = [(r["global_iteration"], r["loss"]) for r in train if r["step"] == step_name]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=f"step {step_name}", marker=".", ms=3)
        _step_boundaries(ax, train + val)
        ax.set_ylabel("training loss")
        ax.set_title("loss per curriculum step")
        if train:
            ax.legend(loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        ax = axes[1]
        names = _ordered_unique(name for r in val for name in r.get("dice", {}))
        palette = plt.get_cmap("Dark2")
        for i, name in enumerate(names):
            pts = [(r["global_iteration"], r["dice"][name]) for r in val
                   if r.get("dice", {}).get(name) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=name, lw=0.8, alpha=0.6, color=palette(i % 8))
        step_names = _ordered_unique(r["step"] for r in train + val)
        for i, step_name in enumerate(step_names):  # the curve of every step, in the step's colour of the loss plot
            pts = [(r["global_iteration"], r["mean_dice"]) for r in val
                   if r["step"] == step_name and r.get("mean_dice") is not None]
            if pts:
                target = next(r.get("target") for r in val if r["step"] == step_name)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=f"C{i % 10}", lw=2, marker=".", ms=4,
                        label=f"step {step_name} mean ({target})")
        kept = [r for r in self.records if r.get("type") == "restore"]
        if kept:
            ax.plot([r["global_iteration"] for r in kept], [r["mean_dice"] for r in kept], "k*", ms=10,
                    label="step ended with earlier, better weights")
        ema = [(r["global_iteration"], r["ema"]) for r in val if r.get("ema") is not None]
        if ema:
            ax.plot([p[0] for p in ema], [p[1] for p in ema], "k--", lw=0.8, label="mean (moving avg.)")
        _step_boundaries(ax, train + val)
        ax.set_ylim(0, 1)
        ax.set_xlabel("iteration (all steps)")
        ax.set_ylabel("validation Dice")
        if names:
            ax.legend(loc="lower right", fontsize=8, ncol=2)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
        plt.close(fig)


def _step_boundaries(ax: Any, records: list[dict[str, Any]]) -> None:
    first: dict[Any, float] = {}
    for r in records:
        first.setdefault(r["step"], r["global_iteration"])
    for step_name, x in first.items():
        ax.axvline(x, color="grey", lw=0.5, ls=":")


def _ordered_unique(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe copy: numpy numbers → Python, NaN/inf → None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
