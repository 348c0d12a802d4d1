"""Benchmarks: our GPT model against Hugging Face transformers' GPT-2, measured in the same run.

Run `python -m benchmarks.run` (or `--quick` for a tiny smoke run); see README "Performance".
"""

from llmfs.errors import quiet_interrupt_while_starting

quiet_interrupt_while_starting()
