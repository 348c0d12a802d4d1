"""Chapter 3: attention mechanisms, from simple self-attention to causal multi-head attention."""
