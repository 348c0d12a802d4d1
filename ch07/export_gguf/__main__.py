"""`python -m ch07.export_gguf ...`: write a model as GGUF with an Ollama Modelfile (see `ch07.export_gguf.export_gguf`)."""

import sys

from ch07.export_gguf.export_gguf import main

sys.exit(main())
