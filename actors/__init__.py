"""Rollout workers: generate with vLLM, score, stream samples to the broker, take new weights."""
