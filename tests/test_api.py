"""The public surface is pinned: these names are the contract."""

import bnjax


def test_public_names_are_pinned():
  assert sorted(bnjax.__all__) == [
      "BatchNorm", "BatchNormParams", "BatchNormState", "BatchStats", "CumulativeState",
      "WhiteningBatchNorm", "WhiteningState", "WhiteningStats", "batch_norm", "from_torch_momentum",
      "group_norm", "init", "init_params", "init_whitening", "instance_norm", "layer_norm",
      "rms_norm", "update_running_stats", "whitening_batch_norm",
  ]
  for name in bnjax.__all__:
    assert getattr(bnjax, name) is not None


def test_state_and_params_are_named_tuples_with_documented_fields():
  assert bnjax.BatchNormParams._fields == ("scale", "bias")
  assert bnjax.BatchNormState._fields == ("mean", "var")
  assert bnjax.BatchStats._fields == ("mean", "var", "count", "updated")


def test_version_is_a_string():
  assert isinstance(bnjax.__version__, str) and bnjax.__version__.count(".") == 2


def test_core_modules_do_not_import_flax():
  import ast
  import importlib.util
  for module in ("bnjax.types", "bnjax.stats", "bnjax.distributed", "bnjax.functional",
                 "bnjax._checks", "bnjax.norms"):
    with open(importlib.util.find_spec(module).origin) as f:
      tree = ast.parse(f.read())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "flax"], module
