"""WORKDIR/curves.png from metrics.jsonl: written whole, or not at all."""

import json

import pytest

from clclm_jax.train import curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_curves_png_from_losses_and_validation_aucs(tmp_path):
  rows = [{"step": s, "train/loss": 2.0 / s} for s in range(1, 11)]
  for r in rows[4::5]:
    r["valid/auc"] = 0.5 + 0.01 * r["step"]
  out = curves.write_curves(_metrics(tmp_path / "metrics.jsonl", rows), tmp_path / "curves.png",
                            title="tiny", valid_reference=0.7)
  assert out == tmp_path / "curves.png" and out.read_bytes()[:8] == PNG_MAGIC
  assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "metrics.jsonl"]  # no temporary left


def test_curves_without_validation_or_rows(tmp_path):
  rows = [{"step": s, "train/loss": 1.0} for s in (1, 2)]
  assert curves.write_curves(_metrics(tmp_path / "a.jsonl", rows), tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
  assert curves.write_curves(_metrics(tmp_path / "b.jsonl", []), tmp_path / "b.png") is None
  assert not (tmp_path / "b.png").exists()


def test_a_failed_save_leaves_the_previous_png(tmp_path, monkeypatch):
  path = _metrics(tmp_path / "metrics.jsonl", [{"step": 1, "train/loss": 1.0}])
  out = curves.write_curves(path, tmp_path / "curves.png")
  before = out.read_bytes()
  import matplotlib.figure  # pylint: disable=g-import-not-at-top

  def fail(self, fname, **kwargs):
    with open(fname, "wb") as f:
      f.write(b"half")
    raise OSError("disk full")
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
  with pytest.raises(OSError, match="disk full"):
    curves.write_curves(path, out)
  assert out.read_bytes() == before and not (tmp_path / "curves.png.tmp").exists()
