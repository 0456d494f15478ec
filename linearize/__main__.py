import sys

from linearize.cli import main

sys.exit(main())
