"""Chapter 7 bonus: dataset utilities (`find_near_duplicates.py`, `create_passive_voice_entries.py`,
`dataset-utilities.ipynb`).

    python -m ch07.dataset_utils.find_near_duplicates --output dedup.json     # near-duplicates, TF-IDF or MinHash
    python -m ch07.dataset_utils.create_passive_voice_entries --output passive.jsonl   # rewrites via the Ollama API
"""
