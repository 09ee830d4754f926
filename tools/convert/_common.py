"""Shared CLI plumbing for tools/convert: run from a checkout without installing, one-paragraph errors."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_cli(main) -> None:
    """Run ``main()``; user errors (bad input) print one paragraph and exit 2 instead of a traceback."""
    from sage_megatron.fsutil import OutputExistsError
    from sage_megatron.parallel.hf_io import CheckpointError
    from sage_megatron.parallel.layout import LayoutError
    from sage_megatron.parallel.model import UnsupportedModelError
    from sage_megatron.parallel.weight_maps import WeightMapError

    try:
        sys.exit(main())
    except (OutputExistsError, CheckpointError, LayoutError, UnsupportedModelError, WeightMapError,
            FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
