"""`python -m diemlib.data` (`make data`): fetches the data sets the notebooks can fetch into `data/`."""

import sys

from .download import main

sys.exit(main())
