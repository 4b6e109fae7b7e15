"""moe_jax: DeepSeek-V3-style sparse Mixture-of-Experts language models in JAX."""
