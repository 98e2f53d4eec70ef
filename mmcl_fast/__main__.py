"""`python -m mmcl_fast ...` is the `mmcl-fast` command."""
import sys

from .cli import main

sys.exit(main())
