import sys

from loctex.cli import main

sys.exit(main())
