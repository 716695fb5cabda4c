"""CALRec on Amazon Beauty: as configs/calrec_ml100k.py with Beauty as the target domain, scored on the 2,000 seeded
test users the text baselines share (a generation per user over 22k users would take hours on a CPU)."""

from configs import calrec_ml100k


def get_config(name: str = ""):
  """`configs/calrec_beauty.py:aux`: with the auxiliary tasks (`calrec_ml100k.variant`)."""
  c = calrec_ml100k.get_config()
  c.name = "calrec_beauty"
  c.data.dataset = "beauty"
  c.data.test_size = 2000
  c.calrec.target.max_prefixes = 2  # 22k users: 2 prefixes each are ~44k examples, more than the steps read
  c.train.eval_every = 100  # a validation encodes the 12,101-item catalogue: fewer of them
  return calrec_ml100k.variant(c, name, "configs/calrec_beauty.py")
