"""Scoring and reranking sampled images against their captions."""
