"""The function: its deployment zip, and the one source of its configuration.

- :func:`build_lambda_zip`: our handler and engine plus numpy and nibabel wheels;
- :class:`FunctionSpec`: memory, timeout, /tmp, concurrency, retries, event age, smoothing
  and threads, in one place. :func:`function_configuration`,
  :func:`event_invoke_configuration`, :func:`invoke_permission` and
  :func:`notification_configuration` turn it into the keyword arguments of the boto3 calls
  that notebook 02 makes (and the tests, and ``docs/setup_guide.md``), so all three deploy
  the same function.
"""
from __future__ import annotations

import math
import shutil
import time
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from fmri_preproc import resources
from fmri_preproc.contract import INPUT_SUFFIX
from helpers.cloud.settings import BUILD_DIR, PROJECT_ROOT, Settings

LAMBDA_SOURCE = PROJECT_ROOT / "lambda_package"
# AWS Lambda limits: https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html
ZIPPED_LIMIT_MB = 50     # direct upload of a .zip in CreateFunction
UNZIPPED_LIMIT_MB = 250  # everything extracted, layers included
# Fixed timestamp: the same sources give the same zip, so CodeSha256 changes only with code.
ZIP_DATE = (2020, 1, 1, 0, 0, 0)
PRUNE_DIRS = {"__pycache__", "tests", "testing"}
# python3.12 runs on Amazon Linux 2023 (glibc 2.34), so manylinux_2_28 wheels work there;
# numpy >= 2.3 has no manylinux2014 wheels, which rules out python3.11 on Amazon Linux 2.
AWS_RUNTIME = "python3.12"
AWS_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class LambdaZip:
    """A built deployment package."""

    path: Path
    runtime: str
    zipped_mb: float
    unzipped_mb: float

    def report(self) -> str:
        """One line per size, against Lambda's limits."""
        return (f"{self.path.name} for {self.runtime}\n"
                f"  zipped:   {self.zipped_mb:6.1f} MB of {ZIPPED_LIMIT_MB} MB "
                f"({self.zipped_mb / ZIPPED_LIMIT_MB:.0%} of the direct-upload limit)\n"
                f"  unzipped: {self.unzipped_mb:6.1f} MB of {UNZIPPED_LIMIT_MB} MB "
                f"({self.unzipped_mb / UNZIPPED_LIMIT_MB:.0%})")


def local_runtime() -> str:
    """The Lambda runtime that matches this interpreter (e.g. ``python3.11``)."""
    return f"python{sys.version_info.major}.{sys.version_info.minor}"


def build_lambda_zip(*, runtime: str | None = None, for_aws: bool = False,
                     out_dir: Path = BUILD_DIR / "lambda") -> LambdaZip:
    """Install the Lambda's requirements next to its code and zip them.

    Parameters
    ----------
    runtime : str, optional
        Lambda runtime, e.g. ``"python3.12"``; default: ``AWS_RUNTIME`` for AWS, else the
        local interpreter's version (the local cloud runs the zip with this interpreter).
    for_aws : bool
        True: Linux x86_64 (manylinux) wheels for the runtime's Python, as AWS needs.
        False: wheels for this machine, which the local cloud runs.
    out_dir : Path
        Where the staging folder and the zip go.

    Returns
    -------
    LambdaZip

    Notes
    -----
    The installed wheels are kept in ``out_dir`` and reused while the requirements and the
    target are unchanged, so rebuilding after a code change takes a second. For AWS, pip
    evaluates dependency markers against the Python that runs pip, not the target's (pip
    issue 11664): :func:`_complete_for_target` then adds what the target needs (e.g.
    nibabel's ``typing-extensions; python_version < "3.13"``) and removes what it does not.
    """
    runtime = runtime or (AWS_RUNTIME if for_aws else local_runtime())
    stage = out_dir / f"package-{runtime}{'-aws' if for_aws else ''}"
    stamp = stage / ".requirements"
    wanted = f"{runtime} aws={for_aws}\n{(LAMBDA_SOURCE / 'requirements.txt').read_text()}"
    if not stamp.exists() or stamp.read_text() != wanted:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
        _pip_install(stage, runtime, for_aws, ["-r", str(LAMBDA_SOURCE / "requirements.txt")])
        if for_aws:
            _complete_for_target(stage, runtime)
        _prune(stage)
        stamp.write_text(wanted)
    for ours in ("handler.py", "fmri_preproc"):  # our code: always fresh
        target = stage / ours
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    shutil.copy2(LAMBDA_SOURCE / "handler.py", stage)
    shutil.copytree(LAMBDA_SOURCE / "fmri_preproc", stage / "fmri_preproc",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build_*.py"))
    path = out_dir / f"function-{runtime}{'-aws' if for_aws else ''}.zip"
    unzipped = _write_zip(stage, path)
    return LambdaZip(path, runtime, path.stat().st_size / 2**20, unzipped / 2**20)


def _pip_install(stage: Path, runtime: str, for_aws: bool, requirements: list[str], *,
                 no_deps: bool = False) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--upgrade", "--target", str(stage), *requirements]
    if no_deps:
        cmd.append("--no-deps")
    if for_aws:
        version = runtime.removeprefix("python")
        cmd += ["--implementation", "cp", "--python-version", version]
        cmd += [arg for platform in AWS_PLATFORMS for arg in ("--platform", platform)]
    # pip's own chatter (and its warnings about the *calling* environment) is noise here.
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"pip could not install the Lambda's requirements:\n{done.stderr}")


def target_environment(runtime: str) -> dict[str, str]:
    """PEP 508 marker environment of a Lambda runtime (Amazon Linux, x86_64, CPython)."""
    version = runtime.removeprefix("python")
    return {"python_version": version, "python_full_version": f"{version}.0",
            "implementation_name": "cpython", "platform_python_implementation": "CPython",
            "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": "x86_64", "extra": ""}


def missing_for_target(stage: Path, runtime: str) -> list[str]:
    """Requirements of the distributions in ``stage`` that the target needs and lacks.

    Reads each ``*.dist-info/METADATA``, evaluates its ``Requires-Dist`` markers for the
    target runtime and returns those not satisfied by a distribution in ``stage``.
    """
    from importlib.metadata import distributions

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in distributions(path=[str(stage)])}
    env = target_environment(runtime)
    missing = []
    for dist in distributions(path=[str(stage)]):
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            have = installed.get(canonicalize_name(req.name))
            if have is None or not req.specifier.contains(have, prereleases=True):
                missing.append(str(req.name) + str(req.specifier))
    return sorted(set(missing))


def _complete_for_target(stage: Path, runtime: str) -> None:
    """Install what the target runtime needs that pip left out, until nothing is missing."""
    for _ in range(5):
        missing = missing_for_target(stage, runtime)
        if not missing:
            return
        _pip_install(stage, runtime, True, missing, no_deps=True)
    raise RuntimeError(f"could not complete the Lambda's dependencies for {runtime}: {missing}")


def _prune(stage: Path) -> None:
    """Drop test suites and caches: not needed at run time, and they cost megabytes."""
    for path in sorted(stage.rglob("*"), reverse=True):
        if path.is_dir() and path.name in PRUNE_DIRS and "fmri_preproc" not in path.parts:
            shutil.rmtree(path)
    shutil.rmtree(stage / "bin", ignore_errors=True)


def _write_zip(stage: Path, path: Path) -> int:
    """Zip ``stage`` reproducibly; return the unzipped size in bytes."""
    partial = path.with_suffix(".zip.partial")
    unzipped = 0
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        files = sorted(p for p in stage.rglob("*") if p.is_file() and p.name != ".requirements")
        for file in files:
            info = zipfile.ZipInfo(str(file.relative_to(stage)), date_time=ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, file.read_bytes())
            unzipped += file.stat().st_size
    partial.replace(path)
    return unzipped


# ------------------------------------------------------------------------------------------
# The function's configuration: one source


#: The largest run the workbook expects, (X, Y, Z, volumes): a real 3 T scan, the shared
#: studyforrest run (the simulated runs are smaller). Notebook 02's ``largest_run`` parameter.
WORKBOOK_LARGEST_RUN = (80, 80, 35, 156)


@dataclass(frozen=True)
class FunctionSpec:
    """How the function runs. Every value has a reason, given beside it.

    Attributes
    ----------
    memory_mb : int
        ``MemorySize``. The engine's memory depends on the volume's size, not the run's
        length (:mod:`fmri_preproc.resources`): a 64 x 64 x 32 grid needs about 130 MB,
        100 x 100 x 72 about 190 MB; memory also buys CPU (one vCPU at 1,769 MB), and a
        CPU-bound run costs the same GB-seconds below that, only slower.
    timeout_s : int
        ``Timeout``: a safety stop well above a run's duration (a few seconds at this size).
    ephemeral_mb : int
        ``EphemeralStorage``: /tmp holds the download, the run as float32 and the outputs
        (512 MB is free; the largest workbook run needs about 700 MB).
    max_concurrency : int
        Reserved concurrency: at most this many runs at once (a cost cap).
    retry_attempts : int
        Retries of a failed asynchronous invocation (AWS allows 0-2).
    max_event_age_s : int
        How long an event may wait for a free slot (AWS allows 60 s to 6 h): a study of
        1,000 runs at a concurrency of 4 needs hours, so the maximum.
    fwhm_mm : float
        Smoothing kernel, full width at half maximum (mm).
    max_input_mb : float
        Larger uploads get a clear error record instead of an out-of-memory kill.
    blas_threads : int
        One BLAS thread: the engine works volume by volume, and extra threads only fight
        over the function's share of a CPU (measured: 2x the CPU time without this).
    repetition_time_s : float, optional
        A TR (s) that wins over the runs' sidecars and headers, for data whose recorded TR
        is known to be wrong; None (default): sidecar, then header.
    size_check : bool
        Check each run's header against memory, /tmp and time before downloading it
        (:mod:`fmri_preproc.resources`): a run that cannot fit gets a clear error naming the
        setting to raise. The estimate has a 1.25x margin; False skips the check (for runs
        known to fit, or to watch a real timeout or out-of-memory kill).

    The defaults are :meth:`sized_for` the workbook's largest run,
    :data:`WORKBOOK_LARGEST_RUN` (a test checks it); for larger runs, use :meth:`sized_for`.
    """

    memory_mb: int = 1769
    timeout_s: int = 120
    ephemeral_mb: int = 1024
    max_concurrency: int = 4
    retry_attempts: int = 1
    max_event_age_s: int = 21600
    fwhm_mm: float = 6.0
    max_input_mb: float = 136.0
    blas_threads: int = 1
    repetition_time_s: float | None = None
    size_check: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def sized_for(cls, shape, n_volumes: int, *, itemsize: int = 2,
                  compressed_ratio: float = 1.0,
                  cpu_memory_mb: int = resources.LAMBDA_MB_PER_VCPU,
                  **changes) -> "FunctionSpec":
        """A spec whose memory, /tmp, timeout and input limit fit the largest expected run.

        Parameters
        ----------
        shape : (X, Y, Z) tuple
            The largest run's grid (voxels).
        n_volumes : int
            Its number of volumes.
        itemsize : int, optional
            Bytes per stored value (2 for int16 scanner data, 4 for float32).
        compressed_ratio : float, optional
            The upload's size over its stored size (1.0, no gain, is the safe default;
            int16 EPI .nii.gz is about 0.5-0.7).
        cpu_memory_mb : int, optional
            Memory at least this large, for its CPU: 1,769 MB (one vCPU) by default. Below
            that, the engine's time grows as 1 / memory, so its GB-seconds (the price) stay
            about the same: a full vCPU costs no more and finishes sooner. Pass 128 to get
            the least memory that fits in 15 minutes instead.
        **changes
            Other fields (e.g. ``fwhm_mm``, ``max_concurrency``).

        Returns
        -------
        FunctionSpec
            ``memory_mb``: enough memory, at least ``cpu_memory_mb``, and more where CPU is
            needed to finish in 15 minutes; ``timeout_s``: twice the estimate, at least 120 s
            (a cold start and the transfers of a slow, shared machine) and at most 900 s;
            ``ephemeral_mb``: the download, the float32 run and the outputs;
            ``max_input_mb``: the run's stored size (an upload cannot be larger).

        Raises
        ------
        ValueError
            If no Lambda configuration fits (over 15 minutes at one vCPU, or over 10 GB of
            /tmp): split such runs.

        Examples
        --------
        >>> spec = FunctionSpec.sized_for((100, 100, 72), 600)  # doctest: +SKIP
        """
        run = resources.RunShape(tuple(shape), int(n_volumes), itemsize)
        base = cls(**changes)
        smoothed = base.fwhm_mm > 0
        upload = int(run.stored_bytes * compressed_ratio)
        fastest = resources.needs(run, input_bytes=upload, smoothed=smoothed)
        if fastest.seconds > resources.LAMBDA_MAX_TIMEOUT_S or \
                fastest.tmp_mb > resources.LAMBDA_MAX_EPHEMERAL_MB:
            raise ValueError(
                f"A {run} run needs about {fastest.seconds:,.0f} s at one vCPU and "
                f"{fastest.tmp_mb:,.0f} MB of /tmp: over Lambda's "
                f"{resources.LAMBDA_MAX_TIMEOUT_S} s or {resources.LAMBDA_MAX_EPHEMERAL_MB:,}"
                " MB. Split such runs into shorter ones.")
        # memory: what the run needs, or more where the CPU it buys is needed in time
        memory = max(cpu_memory_mb, _round_up(fastest.memory_mb, 64))
        while resources.needs(run, memory_mb=memory, input_bytes=upload, smoothed=smoothed
                              ).seconds > resources.LAMBDA_MAX_TIMEOUT_S:
            memory = min(resources.LAMBDA_MB_PER_VCPU, memory + 64)
        need = resources.needs(run, memory_mb=memory, input_bytes=upload, smoothed=smoothed)
        sized = dict(memory_mb=memory,
                     timeout_s=min(resources.LAMBDA_MAX_TIMEOUT_S,
                                   max(120, _round_up(2 * need.seconds, 30))),
                     ephemeral_mb=max(resources.LAMBDA_MIN_EPHEMERAL_MB,
                                      _round_up(need.tmp_mb, 512)),
                     max_input_mb=float(math.ceil(run.stored_bytes / 2**20 * 1.01 + 1)))
        return cls(**{**sized, **changes})


def _round_up(value: float, step: int) -> int:
    return int(math.ceil(value / step) * step)


HANDLER = "handler.lambda_handler"
TRIGGER_ID = "preprocess-new-runs"
PERMISSION_ID = "s3-invoke"


def function_environment(cfg: Settings, spec: FunctionSpec) -> dict[str, str]:
    """The function's environment variables (the handler requires every one of them)."""
    threads = str(spec.blas_threads)
    env = {"OUTPUT_BUCKET": cfg.output_bucket, "OUTPUT_PREFIX": cfg.output_prefix,
           "INPUT_PREFIX": cfg.input_prefix, "FWHM_MM": str(spec.fwhm_mm),
           "MAX_INPUT_MB": str(spec.max_input_mb),
           # /tmp's size, which the handler checks a run against (Lambda does not expose it)
           "EPHEMERAL_STORAGE_MB": str(spec.ephemeral_mb),
           "SIZE_CHECK": "on" if spec.size_check else "off",
           "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    if spec.repetition_time_s is not None:
        env["REPETITION_TIME_S"] = str(spec.repetition_time_s)
    return env


def function_configuration(cfg: Settings, spec: FunctionSpec, *, role_arn: str,
                           runtime: str) -> dict:
    """Keyword arguments of ``lambda.create_function`` (all but ``Code`` and ``Tags``); also
    valid for ``update_function_configuration``."""
    return dict(FunctionName=cfg.function_name, Role=role_arn, Runtime=runtime,
                Handler=HANDLER, Timeout=spec.timeout_s, MemorySize=spec.memory_mb,
                EphemeralStorage={"Size": spec.ephemeral_mb},
                Description="fMRI preprocessing: motion correction, smoothing, confounds",
                Environment={"Variables": function_environment(cfg, spec)})


def event_invoke_configuration(cfg: Settings, spec: FunctionSpec, *, queue_arn: str) -> dict:
    """Keyword arguments of ``lambda.put_function_event_invoke_config``: retries, event age
    and the on-failure destination."""
    return dict(FunctionName=cfg.function_name, MaximumRetryAttempts=spec.retry_attempts,
                MaximumEventAgeInSeconds=spec.max_event_age_s,
                DestinationConfig={"OnFailure": {"Destination": queue_arn}})


def invoke_permission(cfg: Settings, *, account_id: str) -> dict:
    """Keyword arguments of ``lambda.add_permission``: S3 may invoke the function, for events
    from this workbook's input bucket in this account only."""
    return dict(FunctionName=cfg.function_name, StatementId=PERMISSION_ID,
                Action="lambda:InvokeFunction", Principal="s3.amazonaws.com",
                SourceArn=f"arn:{cfg.partition}:s3:::{cfg.input_bucket}",
                SourceAccount=account_id)


def notification_configuration(cfg: Settings, *, function_arn: str) -> dict:
    """Keyword arguments of ``s3.put_bucket_notification_configuration``: new BOLD runs under
    the input prefix invoke the function (outputs go to another bucket: no loop)."""
    return dict(Bucket=cfg.input_bucket, NotificationConfiguration={
        "LambdaFunctionConfigurations": [{
            "Id": TRIGGER_ID, "LambdaFunctionArn": function_arn,
            "Events": ["s3:ObjectCreated:*"],
            "Filter": {"Key": {"FilterRules": [
                {"Name": "prefix", "Value": cfg.input_prefix},
                {"Name": "suffix", "Value": INPUT_SUFFIX}]}}}]})


def while_role_propagates(call, *args, attempts: int = 10, delay_s: float = 3.0, **kwargs):
    """Call ``call(*args, **kwargs)``, retrying while a brand-new role is not usable yet.

    IAM is eventually consistent: for a few seconds after ``create_role`` and
    ``put_role_policy``, Lambda may answer ``InvalidParameterValueException`` ("The role
    defined for the function cannot be assumed by Lambda", or "The function's execution role
    does not have permissions to call SendMessage on SQS"). Anything else is raised at once.
    """
    for attempt in range(attempts):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # botocore's modelled exceptions are made per client
            code = getattr(exc, "response", {}).get("Error", {}).get("Code")
            message = str(exc)
            propagating = code == "InvalidParameterValueException" and (
                "assume" in message or "permission" in message)
            if not propagating or attempt == attempts - 1:
                raise
            time.sleep(delay_s)
