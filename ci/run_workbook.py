"""Run the notebook series in order with papermill; save executed notebooks and HTML.

Usage::

    python ci/run_workbook.py            # default parameters (the full-size workbook)
    python ci/run_workbook.py --ci       # small parameters from ci/parameters.yaml

Executed notebooks go to ``build/notebooks/``, HTML copies to ``build/html/``. The run stops
at the first failing notebook (its executed copy and HTML still show where it failed), and
the local cloud is stopped in that case so no background process is left behind.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import nbformat
import papermill
import yaml
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CI_PARAMETERS = ROOT / "ci" / "parameters.yaml"
CELL_TIMEOUT_S = 900  # a cell stuck (e.g. waiting on a widget) fails the run instead of hanging


def run_series(build_dir: Path, *, ci: bool = False, only: list[str] | None = None,
               overrides: dict | None = None) -> list[dict]:
    """Execute every notebook in order; return one summary per notebook.

    Parameters
    ----------
    build_dir : Path
        Where ``notebooks/`` and ``html/`` go.
    ci : bool
        Use the small parameters of ``ci/parameters.yaml``.
    only : list of str, optional
        Run only notebooks whose names start with these prefixes (e.g. ``["00", "01"]``).
    overrides : dict, optional
        ``{notebook stem: {parameter: value}}``, applied over the CI parameters (e.g. another
        dataset for notebook 03's ``bids_dir``).

    Returns
    -------
    list of dict
        ``notebook``, ``seconds``, ``stderr`` (text the notebook wrote to stderr).
    """
    params = yaml.safe_load(CI_PARAMETERS.read_text()) if ci else {}
    for stem, changes in (overrides or {}).items():
        params[stem] = {**(params.get(stem) or {}), **changes}
    (build_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    (build_dir / "html").mkdir(parents=True, exist_ok=True)
    summaries = []
    for notebook in NOTEBOOKS:
        if only and not any(notebook.name.startswith(p) for p in only):
            continue
        executed = build_dir / "notebooks" / notebook.name
        started = time.monotonic()
        try:
            papermill.execute_notebook(
                str(notebook), str(executed), parameters=params.get(notebook.stem, {}),
                cwd=str(notebook.parent), kernel_name="python3", progress_bar=False,
                execution_timeout=CELL_TIMEOUT_S,
                # Cell errors are kept in the executed notebook; the kernel's own log lines
                # (a TCP-transport notice, an interrupt at shutdown) are only noise here.
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
        finally:
            if executed.exists():
                _export_html(executed, build_dir / "html" / f"{notebook.stem}.html")
        summaries.append({"notebook": notebook.name,
                          "seconds": round(time.monotonic() - started, 1),
                          "stderr": _stderr_text(executed)})
        print(f"{notebook.name}: {summaries[-1]['seconds']} s", flush=True)
    return summaries


def _export_html(executed: Path, html: Path) -> None:
    body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
    html.write_text(body, encoding="utf-8")


def _stderr_text(executed: Path) -> str:
    """What cells wrote to stderr (warnings, tracebacks), for the summary."""
    nb = nbformat.read(executed, as_version=4)
    return "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", [])
                   if out.get("output_type") == "stream" and out.get("name") == "stderr")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ci", action="store_true", help="small CI parameters")
    parser.add_argument("--build-dir", type=Path, default=ROOT / "build")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 01")
    parser.add_argument("--parameters", type=Path,
                        help="YAML {notebook: {parameter: value}} over the CI parameters")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        overrides = yaml.safe_load(args.parameters.read_text()) if args.parameters else None
        summaries = run_series(args.build_dir, ci=args.ci, only=args.only, overrides=overrides)
    except papermill.PapermillExecutionError as exc:
        from helpers import local_cloud
        local_cloud.stop()
        print(f"FAILED in {exc.exec_count and 'cell ' + str(exc.exec_count)}: "
              f"{exc.ename}: {exc.evalue}\nSee build/notebooks/ and build/html/.",
              file=sys.stderr)
        return 1
    (args.build_dir / "workbook_run.json").write_text(json.dumps(summaries, indent=2))
    print(f"{len(summaries)} notebooks in {time.monotonic() - started:.0f} s; "
          f"executed notebooks in {args.build_dir / 'notebooks'}, HTML in {args.build_dir / 'html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
