import sys

from qkdnode.cli import main

sys.exit(main())
