"""Chapter 6 bonus: the book's additional classification experiments (`additional_experiments.py`,
`additional-experiments.ipynb`): which layers train, which token feeds the head, context length,
the causal mask, padding and the loss's ignore index, model size.

    python -m ch06.gpt_class_finetune --trainable-layers last_two_blocks   # one row of the book's table
"""
