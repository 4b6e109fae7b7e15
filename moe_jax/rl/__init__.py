"""R1-Zero-style RL above the engine: verifiable tasks (`tasks`), rule rewards (`rewards`), the
group-relative clipped objective (`objective`), the learner's step with router replay
(`learner`, settings in `config`) and sample-based evaluation (`evaluate`)."""
