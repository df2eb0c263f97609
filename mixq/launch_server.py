"""`python -m mixq.launch_server`: SGLang-style entry point (same flags as `mixq serve`)."""

import sys

from mixq.server.launch import main

if __name__ == "__main__":
    sys.exit(main())
