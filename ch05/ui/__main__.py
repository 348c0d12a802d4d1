"""`python -m ch05.ui`: serve the chapter-5 web page (see `ch05.ui.app`)."""

import sys

from ch05.ui.app import main

sys.exit(main())
