"""WORKDIR/curves.png: a run's training loss and validation AUC against steps, drawn from metrics.jsonl."""

import json
import os
import pathlib


def read_rows(metrics_path: pathlib.Path) -> list[dict]:
  """metrics.jsonl's rows ([] if absent); a last line cut short by a killed run is dropped, any other bad line
  fails naming the file and line."""
  lines = [l for l in metrics_path.read_text().splitlines() if l.strip()] if metrics_path.exists() else []
  rows = []
  for k, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(lines) - 1:
        break
      raise ValueError(f"{metrics_path}, line {k + 1}: not JSON ({e.msg}); delete that line or the file") from e
  return rows


def write_curves(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, title: str = "",
                 valid_reference: float | None = None) -> pathlib.Path | None:
  """Loss per step (left) and validation AUC with the best step marked (right; `valid_reference`, e.g. the
  history like-ratio on the same prompts, as a dashed line). Written to a temporary file, then renamed, so a
  failure never leaves half a PNG. Returns None when metrics.jsonl has no rows."""
  rows = read_rows(pathlib.Path(metrics_path))
  if not rows:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  losses = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
  aucs = [(r["step"], r["valid/auc"]) for r in rows if "valid/auc" in r]
  fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(10, 3.6))
  if losses:
    ax_loss.plot(*zip(*losses), lw=1.2)
  ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
  if aucs:
    ax_auc.plot(*zip(*aucs), marker="o", lw=1.2, label="validation AUC")
    best_step, best = max(aucs, key=lambda sa: (sa[1], -sa[0]))
    ax_auc.scatter([best_step], [best], s=90, facecolors="none", edgecolors="C3", zorder=3,
                   label=f"best {best:.4f} (step {best_step})")
  if valid_reference is not None:
    ax_auc.axhline(valid_reference, ls="--", color="grey", label=f"history like-ratio {valid_reference:.4f}")
  ax_auc.axhline(0.5, ls=":", color="lightgrey")
  ax_auc.set(xlabel="step", ylabel="AUC", title="validation AUC")
  if aucs or valid_reference is not None:
    ax_auc.legend(fontsize=8, loc="best")
  for ax in (ax_loss, ax_auc):
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  out = pathlib.Path(out_png)
  tmp = out.with_name(out.name + ".tmp")
  try:
    fig.savefig(tmp, dpi=110, format="png")
    os.replace(tmp, out)
  finally:
    plt.close(fig)
    tmp.unlink(missing_ok=True)
  return out
