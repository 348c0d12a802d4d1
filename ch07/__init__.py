"""Chapter 7: fine-tuning a GPT model to follow instructions, and scoring its answers with a judge model."""

from llmfs.errors import quiet_interrupt_while_starting

quiet_interrupt_while_starting()
