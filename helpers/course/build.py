"""Build the student and instructor versions of the notebooks from the one source.

The source notebooks in ``notebooks/`` hold every exercise and its worked solution (code
cells tagged ``solution``; see :mod:`helpers.course`). The **student** build drops the
solution cells; the **instructor** build keeps them and marks them. Both builds keep the
``parameters`` cell, so papermill (``ci/run_workbook.py --notebooks-dir``) runs either.

Usage::

    python -m helpers.course.build            # -> build/course/{student,instructor}/
    python -m helpers.course.build --out DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

__all__ = ["SOLUTION_TAG", "EXERCISE_TAG", "VERSIONS", "source_notebooks", "build_notebook",
           "build_course"]

ROOT = Path(__file__).resolve().parents[2]
SOLUTION_TAG, EXERCISE_TAG = "solution", "exercise"
VERSIONS = ("student", "instructor")
INSTRUCTOR_NOTE = "**Worked solution (instructor version).**"


def source_notebooks(folder: Path = ROOT / "notebooks") -> list[Path]:
    """Every notebook of the series, in order (``NN_*.ipynb`` and ``NNx_*.ipynb``, by glob)."""
    return sorted(folder.glob("[0-9][0-9]*_*.ipynb"))


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def build_notebook(source: Path, version: str) -> nbformat.NotebookNode:
    """One notebook in one version.

    Parameters
    ----------
    source : Path
        A source notebook (with solution cells).
    version : {"student", "instructor"}
        ``student`` removes every ``solution`` cell; ``instructor`` keeps them, with a note
        above each.

    Returns
    -------
    nbformat.NotebookNode
        The built notebook, outputs cleared (the source's are already empty).
    """
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, not {version!r}")
    nb = nbformat.read(source, as_version=4)
    cells = []
    for cell in nb.cells:
        if SOLUTION_TAG in _tags(cell):
            if version == "student":
                continue
            cells.append(nbformat.v4.new_markdown_cell(INSTRUCTOR_NOTE,
                                                        metadata={"tags": ["instructor"]}))
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cells.append(cell)
    nb.cells = cells
    nb.metadata["course_version"] = version
    return nb


def build_course(out: Path = ROOT / "build" / "course",
                 notebooks: list[Path] | None = None) -> dict[str, list[Path]]:
    """Write both versions of every notebook under ``out/student`` and ``out/instructor``.

    Returns
    -------
    dict
        ``{version: [written notebook paths]}``.
    """
    notebooks = source_notebooks() if notebooks is None else notebooks
    if not notebooks:
        raise FileNotFoundError("No notebooks to build: expected notebooks/NN_*.ipynb")
    written: dict[str, list[Path]] = {}
    for version in VERSIONS:
        folder = out / version
        folder.mkdir(parents=True, exist_ok=True)
        written[version] = []
        for source in notebooks:
            target = folder / source.name
            # write beside, then rename: a half-written notebook is never visible
            partial = target.with_suffix(".ipynb.partial")
            nbformat.write(build_notebook(source, version), partial)
            partial.replace(target)
            written[version].append(target)
    return written


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "course")
    args = parser.parse_args(argv)
    for version, paths in build_course(args.out).items():
        print(f"{version}: {len(paths)} notebooks in {args.out / version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
