"""The replay-buffer server between actors and the learner."""
