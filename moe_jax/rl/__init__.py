"""R1-Zero-style RL above the engine: verifiable tasks (`tasks`), rule rewards (`rewards`), the
group-relative clipped objective (`objective`), the learner's step with router replay
(`learner`, settings in `config`), rollouts through the engine (`rollout`), their batches and
dynamic sampling (`batch`) and sample-based evaluation (`evaluate`). The loop that joins them:
experiments/r1_zero.py."""
