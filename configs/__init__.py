"""Run configs: `base.py` returns the full default ConfigDict; the other files override a few fields."""
