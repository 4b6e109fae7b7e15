"""The functional DeepSeek-V3 MoE layer: `init`, `apply`, `update_bias` (see `layer.py`)."""
from moe_jax.moe.layer import apply, init, init_fp8_state, swiglu, update_bias

__all__ = ["apply", "init", "init_fp8_state", "swiglu", "update_bias"]
