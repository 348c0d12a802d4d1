"""Chapter 6: fine-tuning a GPT model for text classification (SMS spam)."""
