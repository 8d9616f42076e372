import sys

from moco_fast.cli import main

sys.exit(main())
