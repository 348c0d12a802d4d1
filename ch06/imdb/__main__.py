"""`python -m ch06.imdb ...`: GPT-2, encoders and the baseline on one data set, one table (see `ch06.imdb.compare`)."""

import sys

from ch06.imdb.compare import main

sys.exit(main())
