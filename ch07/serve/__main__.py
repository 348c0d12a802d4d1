"""`python -m ch07.serve ...`: the Ollama-API server for chapter 5-7 models (see `ch07.cli.serve_main`)."""

import sys

from ch07.cli import serve_main

sys.exit(serve_main())
