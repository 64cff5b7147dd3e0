"""Tokenizers: the discrete VAE that turns images into code grids (`dvae`) and the
converter that imports OpenAI's released dVAE weights (`openai_import`)."""
