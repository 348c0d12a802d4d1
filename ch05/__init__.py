"""Chapter 5: pretraining on unlabeled text, decoding strategies, and OpenAI's GPT-2 weights; bonus folders `llama/` (GPT to Llama 3.2 and Qwen3) and `ui/` (a web page)."""

from llmfs.errors import quiet_interrupt_while_starting

quiet_interrupt_while_starting()
