"""``python -m dfkd.cli``: the command line, as ``dfkd`` and ``python -m dfkd`` run it."""
import sys

from dfkd.cli import main

sys.exit(main())
