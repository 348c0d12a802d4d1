"""Chapter 3 bonus: efficient multi-head attention implementations (see mha-implementations.ipynb)."""
