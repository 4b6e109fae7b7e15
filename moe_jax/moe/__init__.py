"""The functional DeepSeek-V3 MoE layer: `init`, `apply`, `update_bias` (see `layer.py`)."""
from moe_jax.moe.layer import apply, update_bias
from moe_jax.moe.local import swiglu
from moe_jax.moe.params import init, init_fp8_state, param_specs

__all__ = ["apply", "init", "init_fp8_state", "param_specs", "swiglu", "update_bias"]
