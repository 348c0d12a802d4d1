"""Chapter 6 bonus: a web page around the chapter's model (spam or not spam, with probabilities): `python -m ch06.ui`."""
