"""Chapter 5 bonus: pretraining on Project Gutenberg; `prepare_dataset.py` turns a folder of books into
tokenized shards.

    python -m ch05.gutenberg.prepare_dataset download                   # the book's download steps
    python -m ch05.gutenberg.prepare_dataset prepare --data-dir gutenberg/data/raw --output-dir OUT
"""
