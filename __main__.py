"""`python -m kvserve ...`: the same command as `kvserve ...`."""
import sys

from kvserve.adapters.cli import main

sys.exit(main())
