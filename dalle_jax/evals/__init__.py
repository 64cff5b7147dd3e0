"""Evaluators and image-quality metrics."""
