"""Command line: ``python -m fmri_preproc IN.nii[.gz] --out DIR [--fwhm MM]``.

Exit codes: 0 done, 2 bad input or arguments (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .inputs import InputError
from .pipeline import preprocess


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fmri_preproc",
        description="Motion-correct, smooth and compute confounds for one 4D BOLD run.",
    )
    parser.add_argument("in_file", help="4D NIfTI run (.nii or .nii.gz)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--fwhm", type=float, default=6.0, help="smoothing FWHM in mm (0: none)")
    parser.add_argument("--reference", default="middle",
                        help="reference volume: middle (default), first, or an index")
    parser.add_argument("--max-bytes", type=int, default=None, help="reject larger input files")
    parser.add_argument("--version", action="version", version=f"fmri_preproc {__version__}")
    args = parser.parse_args(argv)
    if args.fwhm < 0:
        parser.error("--fwhm must be >= 0")
    reference = int(args.reference) if args.reference.lstrip("-").isdigit() else args.reference
    try:
        result = preprocess(args.in_file, args.out, fwhm=args.fwhm, reference=reference,
                            max_bytes=args.max_bytes)
    except InputError as exc:
        print(f"error: {exc.message}\n  likely cause: {exc.cause}\n  what to do: {exc.action}",
              file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) if hasattr(v, "as_posix") else v for k, v in result.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
