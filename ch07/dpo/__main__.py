"""`python -m ch07.dpo ...`: preference-tune a chapter-7 model with DPO (see `ch07.dpo.dpo`)."""

import sys

from ch07.dpo.dpo import cli

sys.exit(cli())
