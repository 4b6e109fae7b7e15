"""Interoperability with other tools' checkpoints. `hf`: Hugging Face DeepseekV3ForCausalLM
(DeepSeek-V3 / V3.1 / R1 and smaller models of the same layout), read and written with
safetensors; nothing here imports torch or transformers."""
from moe_jax.interop.hf import Loaded, export, load, read_config
from moe_jax.interop.hf_config import CheckpointError

__all__ = ["CheckpointError", "Loaded", "export", "load", "read_config"]
