"""Chapter 2: working with text data (tokenizers, data loaders) and the shared helpers
(data download, device choice, quick mode, atomic writes) that every later chapter imports."""
