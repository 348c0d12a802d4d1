"""Chapter 4: a GPT model from scratch (layer norm, GELU, feed-forward, transformer blocks)."""
