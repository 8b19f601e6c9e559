import sys

from velo.cli import main

sys.exit(main())
