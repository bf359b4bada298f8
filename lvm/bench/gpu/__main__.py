"""`python -m lvm.bench.gpu`: the one-GPU check (see the package's docstring)."""

import sys

from lvm.bench.gpu.cli import main

sys.exit(main())
