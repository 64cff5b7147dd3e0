"""Stage-2 model: attention masks (`masks`) and the sparse-attention transformer (`transformer`)."""
