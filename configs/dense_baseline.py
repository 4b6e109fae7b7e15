"""Dense baseline for tiny_moe: the same model, data and run, every block a dense SwiGLU.

Each tiny_moe MoE block runs top_k=2 experts of width 128 plus one shared expert of width 128 per
token, so a dense SwiGLU of width 2*128 + 128 = 384 does the same work per token: the
FLOP-matched comparison, in which the MoE holds about twice the parameters.

  python -m experiments.run --config configs/dense_baseline.py --workdir /tmp/dense
"""
import pathlib
import runpy


def _tiny_moe_config(arg=None):
  # By path: config files are not a package (config_flags loads them by path too).
  return runpy.run_path(str(pathlib.Path(__file__).with_name("tiny_moe.py")))["get_config"](arg)


def get_config(arg=None):
  """arg: "runlocal" as in tiny_moe."""
  config = _tiny_moe_config(arg)
  m, e = config.model, config.moe
  # Dense width = routed experts per token * expert width + shared experts * expert width.
  m.dense_ffn_dim = (e.top_k + e.num_shared_experts) * e.expert_ffn_dim
  m.first_k_dense = m.num_layers        # every block dense; the moe section goes unused
  return config
