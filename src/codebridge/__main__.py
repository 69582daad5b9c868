"""``python -m codebridge`` (used by torchrun: ``torchrun --nproc_per_node 2 -m codebridge train ...``)."""

import sys

from codebridge.cli import main

sys.exit(main())
