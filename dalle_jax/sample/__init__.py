"""Sampling from the stage-2 transformer: KV-cached autoregressive decoding, image completion."""
