import sys

from mergesweep.cli import main

sys.exit(main())
