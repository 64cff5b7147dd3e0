"""Tokenizers: the discrete VAE that turns images into code grids (`dvae`), its parameter
exports (`params_io`) and the importer of OpenAI's released weights (`openai_import`),
pre-encoding of datasets into token shards (`pre_encode`), and the BPE text tokenizer
with per-position pads and deterministic BPE-dropout (`bpe`)."""
