"""Chapter 2 bonus: a byte pair encoding tokenizer that trains, from scratch (`bpe.py`, `bpe-from-scratch.ipynb`)."""
