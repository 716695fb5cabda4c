"""WORKDIR/curves.png from metrics.jsonl: written whole, or not at all."""

import json

import pytest

from clclm_jax.train import curves, trainer

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


def test_a_torn_last_line_is_dropped_and_resume_keeps_the_rows_before_it(tmp_path):
  path = _metrics(tmp_path / "metrics.jsonl", [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3)])
  with path.open("a") as f:
    f.write('{"step": 4, "train/lo')  # the run was killed while writing step 4
  assert [r["step"] for r in curves.read_rows(path)] == [1, 2, 3]
  log = trainer.MetricsLog(tmp_path, resume_step=2)
  log.write({"step": 3, "train/loss": 0.5})
  log.close()
  assert [(r["step"], r["train/loss"]) for r in curves.read_rows(path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
  assert not list(tmp_path.glob("*.tmp"))


def test_a_bad_line_inside_metrics_names_the_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 2: not JSON"):
    curves.read_rows(path)
  assert curves.read_rows(tmp_path / "absent.jsonl") == []
