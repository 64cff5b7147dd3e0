"""Data: TFDS builders writing array_record, NumPy augmentations and the grain input pipeline."""
