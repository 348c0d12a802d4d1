"""Chapter 7 bonus: serve a chapter's model over the Ollama API (`python -m ch07.serve --model ...`).

The server itself is `llmfs.serve`; this folder wires chapter 7's model files and prompt format into it
(`ch07.cli.serve_main`).
"""
