"""`python -m ch05.llama ...`: generate text with Llama 3.x, Qwen3 or GPT-2 (see `ch05.llama.generate_llm`)."""

import sys

from ch05.llama.generate_llm import main

sys.exit(main())
