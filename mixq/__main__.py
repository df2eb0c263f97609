import sys

from mixq.cli import main

sys.exit(main())
