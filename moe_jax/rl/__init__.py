"""R1-Zero-style RL above the engine: verifiable tasks (`tasks`), rule rewards (`rewards`), the
group-relative clipped objective (`objective`) and sample-based evaluation (`evaluate`)."""
