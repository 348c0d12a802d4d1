"""Chapter 7 bonus: export a model to GGUF for llama.cpp and Ollama (`export_gguf.py`).

    python -m ch07.export_gguf --model outputs/ch07/quick-sft.pth [--outtype f32|f16|q8_0] [--output FILE.gguf]
"""
