import sys

from skiptree.cli import main

sys.exit(main())
