"""The same losses and eval scores on 1 device, on 8 simulated devices in 3 mesh shapes, and on 2 processes.

The recipe (every stage, then scoring) runs on one 8-device mesh in the default suite; its other mesh shapes
and its 2-process run are `extended` (`make test-all`).
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from clclm_jax.contrastive.encoder import SeqEncoder, named_linear
from clclm_jax.train import sharding

HERE = pathlib.Path(__file__).parent


def _worker(*args, env=None):
  return subprocess.Popen([sys.executable, str(HERE / "train_worker.py"), *args], cwd=HERE, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def _result(proc, timeout: int = 300):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_rule_table_and_mesh_shapes():
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("lora_rank", "heads")) == P(None, "tensor")
  assert sharding.logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
  assert dict(sharding.make_mesh((-1, 1, 1)).shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh((2, 1, 1))


@pytest.fixture(scope="module")
def mesh_losses():
  return _result(_worker("meshes", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))


def test_meshes_on_8_devices_match_one_device(mesh_losses):
  out = dict(mesh_losses)
  ref = np.array(out.pop("1"))
  scores = out.pop("eval")
  np.testing.assert_allclose(scores["(2, 2, 2)"], scores["1"], atol=1e-5)
  assert len(out) == 3
  for shape, losses in out.items():
    np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=shape)


def test_two_processes_match_one_process(mesh_losses):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [_worker("process", str(i), port, env=env) for i in range(2)]
  results = [_result(p) for p in procs]
  for r in results:  # training and evaluation (each process scores its shard; shared prefix agreed)
    np.testing.assert_allclose(r["losses"], mesh_losses["1"], rtol=1e-5)
    np.testing.assert_allclose(r["eval"], mesh_losses["eval"]["1"], atol=1e-5)
    assert r["last_eval_shape"] == [8, 96]  # one shard pads its last batch to 96 tokens, the other to 64


def test_processes_agree_on_batch_widths_by_right_padding_with_zeros():
  batch = {"tokens": np.ones((2, 3), np.int32), "label": np.ones(2, np.int32), "views": np.ones((2, 1, 2))}
  widths = sharding.local_widths(batch)
  assert widths.tolist() == [3, 1, 2]  # sorted keys: label (none), tokens (3), views (1, 2)
  out = sharding.agree_widths(batch, np.array([5, 1, 4]))
  assert out["tokens"].shape == (2, 5) and out["views"].shape == (2, 1, 4) and out["label"] is batch["label"]
  np.testing.assert_array_equal(out["tokens"][:, 3:], 0)
  np.testing.assert_array_equal(out["tokens"][:, :3], 1)
  assert sharding.agree_widths(batch, widths)["tokens"] is batch["tokens"]


@pytest.fixture(scope="module")
def recipe_one_device(tmp_path_factory, data_root):
  one = _worker("recipe", str(tmp_path_factory.mktemp("one")), json.dumps([[1, 1, 1]]),
                env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
  ref = _result(one, timeout=1200)["(1, 1, 1)"]
  assert len(ref["losses"]["encoder"]) > 10 and len(ref["losses"]["fused"]) == 2
  return ref


def _same_recipe_run(got, ref, what):
  for stage, losses in ref["losses"].items():
    np.testing.assert_allclose(got["losses"][stage], losses, rtol=1e-5, err_msg=f"{what} {stage}")
  for k in ("encoder_valid_auc", "valid_auc", "test_auc"):
    assert abs(got[k] - ref[k]) < 1e-6, (what, k, got[k], ref[k])


@pytest.mark.parametrize("mesh", [
    pytest.param([2, 2, 2], id="2x2x2"),  # data, fsdp and tensor splits at once: the default suite's check
    pytest.param([8, 1, 1], id="8x1x1", marks=pytest.mark.extended),
    pytest.param([1, 2, 4], id="1x2x4", marks=pytest.mark.extended),
])
def test_the_recipe_on_8_devices_matches_one_device(mesh, tmp_path, recipe_one_device):
  """Encoder pretraining, the text stage and the fused stage (data, fsdp and tensor splits of the LLM, the
  encoder and the batch), then scoring: the same losses and AUCs as on one device."""
  eight = _result(_worker("recipe", str(tmp_path), json.dumps([mesh]),
                          env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}), timeout=1200)
  assert list(eight) == [str(tuple(mesh))]
  _same_recipe_run(eight[str(tuple(mesh))], recipe_one_device, str(mesh))


@pytest.mark.extended  # the default suite runs two processes through the train step and the scorer (above)
def test_the_recipe_on_two_processes_matches_one_process(tmp_path, recipe_one_device):
  """Two processes (gloo) share the run folder: each reads the global batches and keeps its rows, scores its
  shard of the prompts; process 0 writes the files."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = str(s.getsockname()[1])
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  procs = [_worker("recipe_process", str(tmp_path), str(i), port, env=env) for i in range(2)]
  for i, proc in enumerate(procs):
    _same_recipe_run(_result(proc, timeout=1200), recipe_one_device, f"process {i}")


def test_the_encoder_and_the_fused_heads_carry_logical_axes():
  enc = SeqEncoder(30, hidden=16, num_layers=1, num_heads=2, max_len=8, use_feedback=True, rngs=nnx.Rngs(0))
  specs = {jax.tree_util.keystr(p): sharding._variable_spec(v)  # pylint: disable=protected-access
           for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(enc), is_leaf=lambda x: isinstance(x, nnx.Variable))}
  assert specs["['embed_items']"] == P("tensor", None)  # items like the vocabulary
  assert specs["['layers'][0]['self_attn']['q_proj']['kernel']"] == P(None, "tensor")  # heads
  assert specs["['layers'][0]['down_proj']['kernel']"] == P("tensor", None)  # MLP
  assert specs["['embed_layernorm']['scale']"] == P(None)  # the hidden width stays whole
  head = named_linear(16, 32, ("enc_embed", "mlp"), rngs=nnx.Rngs(0))
  assert sharding._variable_spec(head.kernel) == P(None, "tensor")  # pylint: disable=protected-access
