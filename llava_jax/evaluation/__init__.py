"""Evaluation (being split out of llava_jax/eval.py)."""
