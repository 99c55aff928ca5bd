"""Command line: ``python -m fmri_preproc sub-01_task-rest_bold.nii.gz --out DIR [--fwhm MM]``.

Outputs go to ``DIR/sub-01/[ses-1/]func/`` with fMRIPrep's names, and the summary is printed
as JSON. Exit codes: 0 done, 2 bad input or arguments (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .contract import run_from_key
from .inputs import InputError
from .pipeline import preprocess


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fmri_preproc",
        description="Motion-correct, smooth and compute confounds for one 4D BOLD run.",
    )
    parser.add_argument("in_file", help="4D NIfTI run (.nii or .nii.gz)")
    parser.add_argument("--out", required=True, help="derivatives folder (BIDS layout inside)")
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
        folder = Path(args.out) / run_from_key(Path(args.in_file).name).folder
        result = preprocess(args.in_file, folder, fwhm=args.fwhm, reference=reference,
                            max_bytes=args.max_bytes)
    except (InputError, ValueError) as exc:
        error = exc if isinstance(exc, InputError) else InputError(
            str(exc), cause="Outputs are named from the input's BIDS entities.",
            action="Rename the run, e.g. sub-01_task-rest_bold.nii.gz.")
        print(f"error: {error.message}\n  likely cause: {error.cause}\n  what to do: "
              f"{error.action}", file=sys.stderr)
        return 2
    outputs = {kind: str(path) for kind, path in result.outputs.items()}
    print(json.dumps({"run": result.run.id, "outputs": outputs, **result.summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
