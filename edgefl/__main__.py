import sys

from edgefl.app.cli import main

sys.exit(main())
