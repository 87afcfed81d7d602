"""The command line: ``dfkd teacher | distill | import | inspect | eval | chain | search | audit |
export | list``.

Config overrides follow the config name, either as ``key.path=value`` or ``--key.path value``::

    dfkd teacher --config teacher/lenet5-fmnist train.epochs=4 --optim.lr 0.05

Errors caused by input (config, checkpoint, dataset, name) print one line and exit with 2.
"""
from __future__ import annotations

import sys

from dfkd.cli import commands
from dfkd.cli.parser import build_parser
from dfkd.core.io import describe_os_error
from dfkd_base.errors import DfkdError

# the commands that take no config overrides
NO_OVERRIDES = ("eval", "list", "export", "audit", "import", "inspect")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in NO_OVERRIDES:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return commands.COMMANDS[args.command](args, extra)
    except DfkdError as exc:
        print(f"dfkd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full or read-only disk met mid-run: what was written before is whole (atomic writes)
        print(f"dfkd: error: {describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfkd: interrupted; the last checkpoint is in the run folder's ckpt/", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
