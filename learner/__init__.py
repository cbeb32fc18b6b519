"""The trainer: GRPO with off-policy correction, weights published back to the actors."""
