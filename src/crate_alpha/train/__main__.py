import sys

from .clip import main

sys.exit(main())
