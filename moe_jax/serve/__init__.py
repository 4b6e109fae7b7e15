"""The inference engine: a paged KV pool (MLA slots hold the latent and the RoPE key only), a
block-hash prefix cache with a disk tier, continuous batching, per-request sampling with
log-probs and stops, and usage with its cost. `engine.py` says how a step works."""
from moe_jax.serve.engine import ByteTokenizer, Engine
from moe_jax.serve.pages import PoolFull
from moe_jax.serve.requests import (BadRequest, Choice, Completion, Prices, Request, Usage,
                                    cost_report)

__all__ = ["BadRequest", "ByteTokenizer", "Choice", "Completion", "Engine", "PoolFull", "Prices",
           "Request", "Usage", "cost_report"]
