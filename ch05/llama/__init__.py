"""Chapter 5 bonus: from GPT to Llama 3.2 and Qwen3 (`llama3.py`, `qwen3.py`, their notebooks).

`python -m ch05.llama --model DIR --prompt ...` generates with any of them (`generate_llm.py`).
"""
