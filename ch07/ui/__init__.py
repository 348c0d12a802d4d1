"""Chapter 7 bonus: a web page around the chapter's model (chat with the instruction-tuned model): `python -m ch07.ui`."""
