"""What every script shares at its edge: user errors become one line on stderr and exit code 1."""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


def run_main(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    from library.errors import UserError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(main(argv) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_code", 1))  # e.g. 143 for a run stopped by SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
