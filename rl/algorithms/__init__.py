"""The RL algorithms: the trainer base (rollout -> score -> rewards -> update), DiffusionNFT,
ReFL, Flow-GRPO and AWM (on the group frame, group_trainer.py; GRPO's SDE rollout, sde_rollout.py),
the weight copies and their schedules, the learning-rate schedule, reward scoring."""
