"""The search record (``dam.json``) and the DAM heatmap (``dam.png``).

The record is diffora's own file, kept beside the adapter rather than inside ``adapter_config.json`` (PEFT warns
about and drops unknown keys there). It says what was searched, what was learned and what was kept, so a run can be
inspected, plotted, or fine-tuned again (``diffora train --dam dam.json``) without repeating the search.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .. import __version__
from ..errors import DataError
from ..method.candidates import DAMGrid
from ..method.diagnostics import search_diagnostics
from ..method.search import DAMSearch
from ..select.quota import Selection
from ..select.stability import half_agreement

#: the ``format`` field of a record; :func:`search_record` writes it
RECORD_FORMAT = "diffora.dam/1"


def search_record(search: DAMSearch, selection: Optional[Selection] = None, **extra: Any) -> dict:
    """The search record (``dam.json``, format :data:`RECORD_FORMAT`); ``extra`` fields are added as given.

    ``diagnostics`` says whether the search learned (:func:`diffora.method.diagnostics.search_diagnostics`)."""
    history = search.history
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "diffora_version": __version__,
        "model_class": search.model_class,
        "grid": search.grid.to_dict(),
        "betas": [[float(v) for v in row] for row in search.gates.beta.detach()],
        "gates": search.gate_values(),
        "config": search.config.to_dict(),
        "heads": search.heads,
        "weight_steps": search.weight_steps,
        "gate_steps": search.gate_steps,
        "diagnostics": _diagnostics(search, selection),
        "history": {
            "weight_loss": history.weight_losses,
            "gate_loss": history.gate_losses,
            "gate_snapshots": [{"step": s, "gates": g} for s, g in history.gate_snapshots],
        },
    }
    if selection is not None:
        record["selection"] = selection.to_dict()
    record.update(extra)
    return record


def _diagnostics(search: DAMSearch, selection: Optional[Selection]) -> dict[str, Any]:
    """Gate spread, the held-out check and the flat flag, plus the two-halves stability of the kept set.

    ``warning`` is the search's own (no held-out signal, or flat gates without a held-out verdict). The two-halves
    agreement is recorded but does not warn: seed by seed it is as low on tasks with signal as on shuffled labels
    (docs/method.md, issue 20)."""
    found = search_diagnostics(search)
    if selection is not None:
        found.update(half_agreement(search, selection.keep_ratio, selection.granularity))
    return found


def load_record(path: str | Path) -> dict:
    """Read a ``dam.json``; raises :class:`DataError` if it is not one."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"search record {path} does not exist; pass the dam.json written by 'diffora search'") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"search record {path} is not valid JSON ({exc.__class__.__name__}); pass a dam.json") from None
    except OSError as exc:
        raise DataError(f"cannot read search record {path} ({exc.strerror}); pass the dam.json file") from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or "grid" not in record:
        found = record.get("format") if isinstance(record, dict) else None
        raise DataError(
            f"{path} is not a diffora search record (format {found!r}, this version reads '{RECORD_FORMAT}')"
        )
    names = record["grid"].get("names") if isinstance(record["grid"], dict) else None
    if not isinstance(names, list) or not all(isinstance(row, list) for row in names):
        raise DataError(f"{path}: the search record's 'grid' is damaged; pass a dam.json written by 'diffora search'")
    return record


def plot_dam(record: dict, path: str | Path, title: Optional[str] = None) -> Path:
    """Heatmap of the learned gates (rows = layers, columns = module types), kept entries outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    grid = DAMGrid.from_dict(record["grid"])
    gates = np.array(record["gates"], dtype=float)
    valid = np.array(grid.valid_mask(), dtype=bool)
    shown = np.where(valid, gates, np.nan)
    rows, cols = gates.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * cols, 1.2 + 0.38 * rows), dpi=110)
    # Colour the range the gates actually span: after a short search they differ by tenths, and a fixed 0..1
    # scale would paint them all alike. The printed values keep the absolute scale readable.
    vmin = float(np.nanmin(shown)) if valid.any() else 0.0
    vmax = float(np.nanmax(shown)) if valid.any() else 1.0
    if vmax - vmin < 1e-6:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    image = ax.imshow(shown, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax, label="gate g = relaxed DAM entry", fraction=0.05, pad=0.03)
    ax.set_xticks(range(cols), grid.labels, rotation=35, ha="right")
    ax.set_yticks(range(rows), [_layer_label(layer) for layer in grid.layers])
    ax.set_xlabel("module type")
    ax.set_ylabel("layer")
    selection = record.get("selection")
    if selection:
        for i, row in enumerate(selection["mask"]):
            for j, kept in enumerate(row):
                if kept:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.2))
        subtitle = (
            f"kept {len(selection['modules'])}/{int(valid.sum())} (red boxes), rho={selection['keep_ratio']}, "
            f"{selection['granularity']}, ranked by {record.get('config', {}).get('selection_score', 'gate')}"
        )
    else:
        subtitle = "no selection yet"
    if rows * cols <= 120:
        for i in range(rows):
            for j in range(cols):
                if valid[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{gates[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if gates[i, j] < vmin + 0.6 * (vmax - vmin) else "black",
                    )
    ax.set_title((title + "\n" if title else "") + subtitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def _layer_label(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(parts[-2:]) if len(parts) > 2 else layer
