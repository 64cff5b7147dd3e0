"""Evaluations of generated samples (e.g. caption-match checks on the `shapes` dataset)."""
