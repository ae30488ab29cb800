"""The paper's figures from a `Study` (matplotlib, Agg backend, PNG).

- Fig. 1: Average accuracy against inference time (a) and against training memory (b), one point per method.
- Fig. 3 / Fig. A1: GFLOPs (bars, right axis) and Average accuracy (lines, left axis) by merge layer, for
  AdaptFormer / Bi-AdaptFormer.
A figure without any of our points is not drawn.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from fpet.tables.build import (LAYER_MERGES, LAYERS, PAPER_PETS, Study, label, main_rows, merge_label,
                               paper_efficiency, pet_label)
from fpet.tables.collect import Method
from fpet.tables.paper import paper_method

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig1(study: Study, path: str | Path) -> Optional[Path]:
    """Accuracy vs inference time and vs training memory; filled = ours, hollow grey = the paper's values."""
    points = []  # (label, accuracy, {"time": x, "memory": x})
    for pet, variant in main_rows(study):
        s = study.get(pet, variant)
        if s is not None and s.average is not None:
            points.append((label(pet, variant), s.average.mean,
                           {"time": s.efficiency.get("latency_ms"), "memory": study.memory(s)}))
    if not any(x is not None for *_, xs in points for x in xs.values()):
        log.info("fig1: no run with an Average accuracy and efficiency figures; not drawn")
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("time", "(a) accuracy vs inference time", "inference time (ms / image)"),
              ("memory", "(b) accuracy vs training memory", f"training memory ({study.memory_unit})"))
    for ax, (metric, title, xlabel) in zip(axes, panels):
        for name, acc, xs in points:
            if xs[metric] is not None:
                ax.scatter(xs[metric], acc, s=40, marker="s" if "fpet" in name else "o")
                ax.annotate(name, (xs[metric], acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if study.paper and (metric == "time" or study.memory_key == "peak_mem_mb"):
            _paper_points(ax, 1 if metric == "time" else 3)
        ax.set(title=title, xlabel=xlabel, ylabel=f"Average accuracy (%, {study.acc_key})")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _paper_points(ax, index: int) -> None:
    """The paper's Table 1 rows: x = column `index` of (acc, time, GFLOPs, memory GB), y = accuracy."""
    for pet in ("full", "linear", *PAPER_PETS):
        for variant in ("none", "fpet"):
            values = paper_efficiency(paper_method(pet, variant))
            if values and values[index] is not None:
                ax.scatter(values[index], values[0], s=40, facecolors="none", edgecolors="grey",
                           label="paper" if (pet, variant) == ("full", "none") else None)
    ax.legend(loc="lower right", fontsize=8)


def _layer_gflops(study: Study, pet: str, layer: int) -> Optional[float]:
    for merge in LAYER_MERGES:
        s = study.get(pet, Method.at_layer(pet, merge, layer, study.backbone).variant)
        if s is not None and s.efficiency.get("gflops") is not None:
            return s.efficiency["gflops"]
    return None


def fig_layers(study: Study, path: str | Path, pet: str = "adaptformer") -> Optional[Path]:
    """GFLOPs bars and accuracy lines by merge layer for each strategy; dashed: without merging."""
    layers = sorted(LAYERS)
    acc = {m: [_average(study, pet, m, layer) for layer in layers] for m in LAYER_MERGES}
    gflops = [_layer_gflops(study, pet, layer) for layer in layers]
    if all(v is None for values in acc.values() for v in values) and all(g is None for g in gflops):
        log.info("%s: no %s runs with a merge layer; not drawn", Path(path).name, pet)
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    bars = ax.twinx()
    positions = list(range(len(layers)))
    bars.bar(positions, [g if g is not None else 0.0 for g in gflops], color="lightgrey", width=0.5)
    bars.set_ylabel("GFLOPs")
    for merge, values in acc.items():
        ax.plot(positions, [v if v is not None else float("nan") for v in values], marker="o",
                label=merge_label(merge))
    base = study.get(pet)
    if base is not None and base.average is not None:
        ax.axhline(base.average.mean, linestyle="--", color="black", label="w/o merging")
    ax.set_zorder(bars.get_zorder() + 1)  # lines above the bars
    ax.patch.set_visible(False)
    ax.set_xticks(positions, [str(layer) for layer in layers])
    ax.set(xlabel="merge layer (0-based block index)", ylabel=f"Average accuracy (%, {study.acc_key})",
           title=f"{pet_label(pet)}: accuracy and GFLOPs by merge layer")
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _average(study: Study, pet: str, merge: str, layer: int) -> Optional[float]:
    s = study.get(pet, Method.at_layer(pet, merge, layer, study.backbone).variant)
    return s.average.mean if s is not None and s.average is not None else None


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_figures(study: Study, out_dir: str | Path) -> list[Path]:
    """Fig. 1, Fig. 3 (AdaptFormer) and Fig. A1 (Bi-AdaptFormer) into `out_dir`; those without data are skipped."""
    out_dir = Path(out_dir)
    written = [fig1(study, out_dir / "fig1.png"),
               fig_layers(study, out_dir / "fig3.png", "adaptformer"),
               fig_layers(study, out_dir / "figA1.png", "bi_adaptformer")]
    return [p for p in written if p is not None]
