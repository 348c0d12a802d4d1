"""Chapter 5: pretraining on unlabeled text, decoding strategies, checkpoints, and OpenAI's GPT-2 weights."""
