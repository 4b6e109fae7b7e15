"""`experiment=sample`: greedy continuations of a few fixed prompts from the workdir's latest
checkpoint, printed as text (the README's sample comes from here), through the serving engine."""
import jax

from moe_jax import train
from moe_jax.config import ExperimentConfig
from moe_jax.serve import Engine, Request

PROMPTS = ("def ", "import ", "class ")
NEW_TOKENS = 96


def run(config: ExperimentConfig, workdir: str):
  setup, state, step = train.load_state(config, workdir)
  new_tokens = min(NEW_TOKENS, config.model.max_seq_len - max(map(len, PROMPTS)) - 1)
  engine = Engine(state["params"], state["moe_state"], config.model, config.moe, mesh=setup.mesh,
                  num_blocks=64, max_batch=len(PROMPTS))
  done = engine.generate([Request(p, max_tokens=new_tokens, ignore_eos=True) for p in PROMPTS])
  samples = [prompt + d.choices[0].text for prompt, d in zip(PROMPTS, done)]
  if jax.process_index() == 0:
    print(f"greedy samples from step {step}:")
    for text in samples:
      print("-" * 60)
      print(text)
  return samples
