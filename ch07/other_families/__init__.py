"""Chapter 7 bonus: instruction fine-tuning (with or without appendix E's LoRA) of Llama 3, Qwen3 and
Gemma 3, saved as a Hugging Face folder (`family_finetuning.py`, `other-families.ipynb`).

    python -m ch07.gpt_instruction_finetuning --model path/to/Qwen3-0.6B --lora-rank 16 --lora-targets q,k,v,o
"""
