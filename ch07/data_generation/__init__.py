"""Chapter 7 bonus: generating and improving instruction data with a local model behind the Ollama API
(`generate_instruction_data.py`, `reflection.py`, `dataset-generation.ipynb`).

    python -m ch07.data_generation.generate_instruction_data --num-samples 5   # Magpie-style records
    python -m ch07.data_generation.reflection --mode response --limit 3        # Reflection-Tuning
"""
