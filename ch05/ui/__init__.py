"""Chapter 5 bonus: a web page around the chapter's model (continue a prompt token by token): `python -m ch05.ui`."""
