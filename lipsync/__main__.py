"""`python -m lipsync` is the same as the `lipsync` command."""
import sys

from lipsync.cli import main

sys.exit(main())
