"""Run the notebook series in order with papermill; save executed notebooks and HTML.

Usage::

    python ci/run_workbook.py            # default parameters (the full-size workbook)
    python ci/run_workbook.py --ci       # small parameters from ci/parameters.yaml
    python ci/run_workbook.py --ci --course student   # the student build (helpers.course.build)

Executed notebooks go to ``build/notebooks/``, HTML copies to ``build/html/``. The run stops
at the first failing notebook (its executed copy and HTML still show where it failed), and
the local cloud is stopped in that case so no background process is left behind.

Account ids are redacted in every executed copy and its HTML, in every mode: a 12-digit
number in a cell's output (an ARN, ``get_caller_identity``) becomes ``<account-id>``, so
executed notebooks can be shared without telling which AWS account made them. (The local
cloud's account, 123456789012, is redacted too: one rule, the same outputs in both modes.)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import nbformat
import papermill
import yaml
from nbconvert import HTMLExporter

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
CI_PARAMETERS = ROOT / "ci" / "parameters.yaml"
CELL_TIMEOUT_S = 900  # a cell stuck (e.g. waiting on a widget) fails the run instead of hanging
# A 12-digit AWS account id standing alone (an ARN's ":123456789012:"): not part of a longer
# number (a 13-digit timestamp in ms) nor of a hex id (a widget's model id).
ACCOUNT_ID_RE = re.compile(r"(?<![0-9A-Za-z])[0-9]{12}(?![0-9A-Za-z])")
REDACTED = "<account-id>"


def run_series(build_dir: Path, *, ci: bool = False, only: list[str] | None = None,
               overrides: dict | None = None, notebooks_dir: Path = NOTEBOOKS_DIR) -> list[dict]:
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
    notebooks_dir : Path
        Where the notebooks to run are: the source (default) or a course build
        (``build/course/student``); they run with ``notebooks/`` as working folder either way.

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
    from helpers.course.build import source_notebooks
    for notebook in source_notebooks(notebooks_dir):
        if only and not any(notebook.name.startswith(p) for p in only):
            continue
        executed = build_dir / "notebooks" / notebook.name
        started = time.monotonic()
        try:
            papermill.execute_notebook(
                str(notebook), str(executed), parameters=params.get(notebook.stem, {}),
                cwd=str(NOTEBOOKS_DIR), kernel_name="python3", progress_bar=False,
                execution_timeout=CELL_TIMEOUT_S,
                # Cell errors are kept in the executed notebook; the kernel's own log lines
                # (a TCP-transport notice, an interrupt at shutdown) are only noise here.
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"])
        finally:
            if executed.exists():
                redact_account_ids(executed)
                _export_html(executed, build_dir / "html" / f"{notebook.stem}.html")
        summaries.append({"notebook": notebook.name,
                          "seconds": round(time.monotonic() - started, 1),
                          "stderr": _stderr_text(executed)})
        print(f"{notebook.name}: {summaries[-1]['seconds']} s", flush=True)
    return summaries


def redact_account_ids(executed: Path) -> int:
    """Replace account ids in the outputs of an executed notebook, in place.

    Outputs change (stream text, every text-like display format, error values and
    tracebacks), and so do the parameters papermill injected (e.g. ``existing_role_arn``);
    the notebook's own source cells stay as written. Returns how many ids were replaced.
    """
    nb = nbformat.read(executed, as_version=4)
    count = 0

    def scrub(value):
        nonlocal count
        if isinstance(value, str):
            value, n = ACCOUNT_ID_RE.subn(REDACTED, value)
            count += n
        elif isinstance(value, list):
            value = [scrub(item) for item in value]
        elif isinstance(value, dict):
            value = {key: scrub(item) for key, item in value.items()}
        return value

    papermill_meta = nb.metadata.get("papermill", {})
    if "parameters" in papermill_meta:
        papermill_meta["parameters"] = scrub(dict(papermill_meta["parameters"]))
    for cell in nb.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            cell.source = scrub(cell.source)
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if "text" in output:
                output["text"] = scrub(output["text"])
            for mime, data in output.get("data", {}).items():
                if mime.startswith("text/") or mime.endswith(("json", "javascript")):
                    output["data"][mime] = scrub(data)
            if output.get("output_type") == "error":
                output["evalue"], output["traceback"] = scrub(output["evalue"]), scrub(output["traceback"])
    nbformat.write(nb, executed)
    return count


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
    parser.add_argument("--course", choices=("student", "instructor"),
                        help="build the course (helpers.course.build) and run this version")
    args = parser.parse_args(argv)
    notebooks_dir = NOTEBOOKS_DIR
    if args.course:
        from helpers.course.build import build_course
        build_course(args.build_dir / "course")
        notebooks_dir = args.build_dir / "course" / args.course
    started = time.monotonic()
    try:
        overrides = yaml.safe_load(args.parameters.read_text()) if args.parameters else None
        summaries = run_series(args.build_dir, ci=args.ci, only=args.only, overrides=overrides,
                               notebooks_dir=notebooks_dir)
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
