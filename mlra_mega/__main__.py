"""`python -m mlra_mega` is the `mlra-mega` console script."""

import sys

from mlra_mega.cli import main

sys.exit(main())
