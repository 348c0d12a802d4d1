"""`python -m ch07.ui`: serve the chapter-7 web page (see `ch07.ui.app`)."""

import sys

from ch07.ui.app import main

sys.exit(main())
