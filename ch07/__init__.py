"""Chapter 7: fine-tuning a GPT model to follow instructions, and scoring its answers with a judge model."""
