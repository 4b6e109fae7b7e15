"""`experiment=sample`: greedy continuations of a few fixed prompts from the workdir's latest
checkpoint, printed as text (the README's sample comes from here)."""
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import data, model, train
from moe_jax.config import ExperimentConfig

PROMPTS = ("def ", "import ", "class ")
NEW_TOKENS = 96


def run(config: ExperimentConfig, workdir: str):
  setup, state, step = train.load_state(config, workdir)
  new_tokens = min(NEW_TOKENS, config.model.max_seq_len - max(map(len, PROMPTS)) - 1)
  samples = []
  for prompt in PROMPTS:  # one prompt at a time: generate() needs equal prompt lengths
    ids = jnp.asarray(data.encode(prompt, bos=True)[None, :], jnp.int32)
    with jax.set_mesh(setup.mesh):  # the expert-parallel layer reads the mesh from context
      out = model.generate(state["params"], state["moe_state"], ids, config.model, config.moe,
                           max_new_tokens=new_tokens, key=jax.random.PRNGKey(0))
    samples.append(data.decode(np.asarray(out[0])))
  if jax.process_index() == 0:
    print(f"greedy samples from step {step}:")
    for text in samples:
      print("-" * 60)
      print(text)
  return samples
