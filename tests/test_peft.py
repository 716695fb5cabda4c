"""PEFT adapter round trips with the `peft` library on a tiny random LLaMA."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

from clclm_jax.model.config import LoraConfig
from clclm_jax.model.errors import ModelError
from clclm_jax.model.loading import load_model
from clclm_jax.model.peft import export_peft, load_peft
from test_model import TOKENS, hf_logits, save_peft_adapter, save_tiny_hf


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_peft")
  save_tiny_hf(path, tie=False, seed=1)
  return path


def _hf(tiny_dir):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.LlamaForCausalLM.from_pretrained(tiny_dir).eval()


def test_export_then_peft_loads_same_logits(tiny_dir, tmp_path):
  lora = LoraConfig(r=4, alpha=8.0, dropout=0.1, targets=("q_proj", "v_proj", "down_proj"))
  model, _ = load_model(tiny_dir, lora=lora, lora_seed=3)
  for j, (_, lin) in enumerate(model.projections(lora.targets)):
    lin.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(j), lin.lora_b.shape))
  out = export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tiny_dir))
  cfg = json.loads((out / "adapter_config.json").read_text())
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["task_type"] == "CAUSAL_LM"
  assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  theirs = peft.PeftModel.from_pretrained(_hf(tiny_dir), out).eval()
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  assert np.abs(ours - hf_logits(theirs, TOKENS)).max() <= 1e-4
  assert np.abs(ours - hf_logits(_hf(tiny_dir), TOKENS)).max() > 1e-3  # The adapter matters.
  export_peft(model, out)  # Overwrites in place.
  assert not list(tmp_path.glob(".adapter*"))


def test_peft_saved_adapter_imports(tiny_dir, tmp_path):
  theirs = save_peft_adapter(_hf(tiny_dir), ["k_proj", "o_proj", "gate_proj"], tmp_path / "from_peft")
  model, _ = load_model(tiny_dir)
  load_peft(model, tmp_path / "from_peft")
  assert model.lora_config == LoraConfig(r=2, alpha=6.0, dropout=0.0, targets=("k_proj", "o_proj", "gate_proj"))
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  assert np.abs(ours - hf_logits(theirs, TOKENS)).max() <= 1e-4


def test_export_without_lora_fails(tiny_dir, tmp_path):
  model, _ = load_model(tiny_dir)
  with pytest.raises(ModelError, match="has no LoRA adapters to export"):
    export_peft(model, tmp_path / "none")


def test_load_peft_errors(tiny_dir, tmp_path):
  model, _ = load_model(tiny_dir)
  with pytest.raises(ModelError, match=r"adapter_config.json: missing"):
    load_peft(model, tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["qkv_proj"]}))
  with pytest.raises(ModelError, match=r"adapter_config.json: LoRA target\(s\) \['qkv_proj'\] unknown"):
    load_peft(model, tmp_path)
  (tmp_path / "adapter_config.json").write_text(json.dumps(
      {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
  with pytest.raises(ModelError, match="neither adapter_model.safetensors nor adapter_model.bin"):
    load_peft(model, tmp_path)
  (tmp_path / "adapter_model.safetensors").write_bytes(b"\x10\x00garbage")
  with pytest.raises(ModelError, match="adapter_model.safetensors: corrupt or unreadable"):
    load_peft(model, tmp_path)


def test_export_names_every_layer_and_is_the_same_for_scan_and_unrolled(tiny_dir, tmp_path):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  lora = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "up_proj"))
  model, _ = load_model(tiny_dir, lora=lora, lora_seed=3)
  for j, (_, lin) in enumerate(model.projections(lora.targets)):
    lin.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(j), lin.lora_b.shape))
  model.scan_layers = True
  scan = load_file(str(export_peft(model, tmp_path / "scan") / "adapter_model.safetensors"))
  model.scan_layers = False
  unrolled = load_file(str(export_peft(model, tmp_path / "unrolled") / "adapter_model.safetensors"))
  layers = model.config.num_hidden_layers
  assert sorted(scan) == sorted(
      f"base_model.model.model.layers.{i}.{block}.lora_{w}.weight"
      for i in range(layers) for block in ("self_attn.q_proj", "mlp.up_proj") for w in "AB")
  for name, w in scan.items():
    np.testing.assert_array_equal(w, unrolled[name])
  q = model.layers.self_attn.q_proj
  np.testing.assert_array_equal(scan["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"],
                                np.asarray(q.lora_b[...][1]).T)
  reloaded, _ = load_model(tiny_dir)
  load_peft(reloaded, tmp_path / "scan")
  again = load_file(str(export_peft(reloaded, tmp_path / "again") / "adapter_model.safetensors"))
  for name, w in scan.items():
    np.testing.assert_array_equal(w, again[name])


def test_export_never_deletes_a_folder_that_is_not_an_adapter(tiny_dir, tmp_path):
  """Issue 52 item 2: exporting into a run folder (or any folder of other files) refused, nothing touched; an
  adapter folder is replaced whole; an empty folder is filled."""
  model, _ = load_model(str(tiny_dir), lora=LoraConfig(r=2, alpha=4))
  run = tmp_path / "run"
  run.mkdir()
  (run / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(ModelError, match=r"run: exists and is not a PEFT adapter folder .* nothing written"):
    export_peft(model, run)
  assert [p.name for p in run.iterdir()] == ["metrics.jsonl"] and not list(tmp_path.glob(".run.*"))
  adapter = export_peft(model, tmp_path / "adapter")
  (adapter / "stale.txt").write_text("from an older export")
  export_peft(model, adapter)  # replaced whole
  assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
  (tmp_path / "empty").mkdir()
  assert (export_peft(model, tmp_path / "empty") / "adapter_config.json").is_file()
