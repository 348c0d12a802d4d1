"""Chapter 6: fine-tuning a GPT model for text classification (SMS spam)."""

from llmfs.errors import quiet_interrupt_while_starting

quiet_interrupt_while_starting()
