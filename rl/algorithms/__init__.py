"""The RL algorithms: the trainer base (rollout -> score -> rewards -> update), DiffusionNFT,
ReFL, the weight copies and their schedules, the learning-rate schedule, reward scoring."""
