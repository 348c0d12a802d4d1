"""Chapter 7 bonus: preference tuning with DPO (`dpo.py`, `preference_data.py`, `dpo-from-scratch.ipynb`).

    python -m ch07.dpo --model outputs/ch07/quick-sft.pth --quick   # DPO on a chapter-7 model
    python -m ch07.dpo.preference_data --output pairs.jsonl         # polite/impolite pairs from an Ollama-API server
"""
