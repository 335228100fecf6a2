import sys

from mergesweep.cli import main

# guarded: a multiprocessing "spawn" worker imports the main module again (as __mp_main__)
if __name__ == "__main__":
    sys.exit(main())
