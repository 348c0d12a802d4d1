"""Appendix E: parameter-efficient fine-tuning with LoRA."""
