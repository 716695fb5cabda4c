"""LoRA adapters in the Hugging Face PEFT format (adapter_config.json + adapter_model.safetensors)."""

import json
import os
import pathlib
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from clclm_jax.model.config import LORA_TARGETS, LoraConfig
from clclm_jax.model.errors import ModelError
from clclm_jax.model.llama import Llama
from clclm_jax.model.lora import add_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.(layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.default)?\.weight$")


def export_peft(model: Llama, out_dir: str | os.PathLike, base_model_name_or_path: str = "") -> pathlib.Path:
  """Writes the model's LoRA as a PEFT adapter folder (atomically: temp folder, then rename)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  cfg = model.lora_config
  if cfg is None:
    raise ModelError(f"{out_dir}: the model has no LoRA adapters to export (use add_lora first)")
  tensors = {}
  for path, lin in model.projections(cfg.targets):  # stacked [layers, ...]: slice i is layers.{i}
    a_lir, b_lro = (np.asarray(v[...], np.float32) for v in (lin.lora_a, lin.lora_b))
    for i in range(a_lir.shape[0]):
      prefix = f"base_model.model.model.{path.format(i=i)}"
      tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_lir[i].T)
      tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_lro[i].T)
  peft_cfg = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
      "lora_dropout": cfg.dropout, "target_modules": list(cfg.targets), "bias": "none",
      "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
      "base_model_name_or_path": base_model_name_or_path,
  }
  out = pathlib.Path(out_dir)
  if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / CONFIG_FILE).is_file())):
    raise ModelError(f"{out}: exists and is not a PEFT adapter folder (no {CONFIG_FILE}); nothing written: "
                     "choose a new or empty folder, or an adapter folder to replace")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  (tmp / CONFIG_FILE).write_text(json.dumps(peft_cfg, indent=2))
  save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
  if out.exists():
    old = out.with_name(f".{out.name}.old")
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)
  else:
    tmp.rename(out)
  return out


def load_peft(model: Llama, adapter_dir: str | os.PathLike) -> Llama:
  """Sets the model's LoRA (adding or replacing adapters) from a PEFT folder, in place; returns it."""
  folder = pathlib.Path(adapter_dir)
  cfg = _read_config(folder / CONFIG_FILE)
  tensors = _read_weights(folder)
  add_lora(model, cfg, jax.random.key(0))
  for path, lin in model.projections(cfg.targets):
    for which, var in (("A", lin.lora_a), ("B", lin.lora_b)):
      layers = []
      for i in range(var.shape[0]):  # stacked [layers, ...]: slice i is layers.{i}
        name = path.format(i=i)
        w = tensors.pop((name, which), None)
        if w is None:
          raise ModelError(f"{folder}: adapter has no lora_{which} for {name}")
        if w.T.shape != var.shape[1:]:
          raise ModelError(f"{folder}: lora_{which} of {name} has shape {w.shape}, "
                           f"expected {var.shape[1:][::-1]}")
        layers.append(w.T)
      var.set_value(jnp.asarray(np.stack(layers), jnp.float32))
  if tensors:
    raise ModelError(f"{folder}: adapter weights for modules the model lacks: {sorted(tensors)[:3]}")
  return model


def _read_config(file: pathlib.Path) -> LoraConfig:
  if not file.is_file():
    raise ModelError(f"{file}: missing; a PEFT adapter folder needs {CONFIG_FILE}")
  try:
    d = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ModelError(f"{file}: not valid JSON ({e})") from e
  if d.get("peft_type", "LORA") != "LORA":
    raise ModelError(f"{file}: peft_type {d.get('peft_type')!r} is not supported (only LORA)")
  for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
    if d.get(flag):
      raise ModelError(f"{file}: {flag}=true is not supported")
  targets = d.get("target_modules")
  if not isinstance(targets, list):
    raise ModelError(f"{file}: target_modules must be a list of projection names, got {targets!r}")
  try:
    return LoraConfig(r=int(d["r"]), alpha=float(d["lora_alpha"]), dropout=float(d.get("lora_dropout", 0.0)),
                      targets=tuple(sorted(targets, key=_order)))
  except KeyError as e:
    raise ModelError(f"{file}: missing field {e}") from e
  except ModelError as e:
    raise ModelError(f"{file}: {e}") from e


def _order(name: str) -> int:
  return LORA_TARGETS.index(name) if name in LORA_TARGETS else len(LORA_TARGETS)


def _read_weights(folder: pathlib.Path) -> dict[tuple[str, str], np.ndarray]:
  """`{(layers.i.block.proj, "A"|"B"): array}` from adapter_model.safetensors or alpaca-lora's .bin."""
  st, pt = folder / WEIGHTS_FILE, folder / "adapter_model.bin"
  if st.is_file():
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      raw = load_file(str(st))
    except Exception as e:  # safetensors raises its own error types for bad files.
      raise ModelError(f"{st}: corrupt or unreadable safetensors file ({e})") from e
  elif pt.is_file():
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ModelError(f"{pt}: reading .bin adapters needs torch; convert it to safetensors") from e
    raw = {k: v.float().numpy() for k, v in torch.load(str(pt), map_location="cpu", weights_only=True).items()}
  else:
    raise ModelError(f"{folder}: neither {WEIGHTS_FILE} nor adapter_model.bin is present")
  out = {}
  for key, w in raw.items():
    m = _KEY.match(key)
    if m is None:
      raise ModelError(f"{folder}: unexpected adapter tensor {key}")
    out[(m.group(1), m.group(2))] = np.asarray(w, np.float32)
  return out
