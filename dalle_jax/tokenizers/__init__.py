"""Tokenizers: the discrete VAE that turns images into code grids (`dvae`, the model;
`dvae_objective`, its training objective; `image_tokenizer`, images <-> token grids), the
importer of OpenAI's released weights (`openai_import`), pre-encoding of datasets into
token shards (`pre_encode`), and the BPE text tokenizer with per-position pads and
deterministic BPE-dropout (`bpe`). Parameter exports are `dalle_jax.exports`."""
