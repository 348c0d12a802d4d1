"""Chapter 2: working with text data (tokenizers, data loaders, embeddings); bonus: BPE from scratch in `ch02.bpe`."""
