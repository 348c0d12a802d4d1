"""`python -m ch06.ui`: serve the chapter-6 web page (see `ch06.ui.app`)."""

import sys

from ch06.ui.app import main

sys.exit(main())
