"""Chapter 7 bonus: scoring instruction responses with a judge model through Ollama's API or OpenAI's.

The code is `ch07.ollama_evaluate` (`python -m ch07.ollama_evaluate --api ollama|openai`); this folder holds
the notebook that compares the two APIs, as the book's ch07/03_model-evaluation holds its two notebooks.
"""
