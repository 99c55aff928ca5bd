"""The Lambda runtime's bootstrap, run by the local executor in a fresh interpreter.

Standard library only: it runs under ``python -I -S``, with the function's task directory
(the extracted zip, read-only) and the runtime directory (boto3) as the only places to
import from, like ``/var/task`` and ``/var/runtime`` on AWS.

Usage: ``bootstrap.py EVENT_FILE RESULT_FD``. The executor reads one JSON line per phase
from the inherited pipe RESULT_FD: ``{"invoked": true}`` once Init (importing the handler)
is over, then ``{"outcome": ...}``. Errors are worded as the AWS Python runtime
(awslambdaric) words them: an import that fails is ``Runtime.ImportModuleError``, a
syntax error ``Runtime.UserCodeSyntaxError``, a missing handler ``Runtime.HandlerNotFound``,
any other exception at import keeps its own type (the service reports such init failures
as ``Runtime.Unknown``).
"""
import importlib
import json
import os
import signal
import sys
import time
import traceback

PR_SET_PDEATHSIG = 1  # Linux prctl


class LambdaContext:
    """The subset of Lambda's context object that handlers use."""

    def __init__(self, request_id, deadline):
        self.aws_request_id = request_id
        self.function_name = os.environ["AWS_LAMBDA_FUNCTION_NAME"]
        self.function_version = os.environ["AWS_LAMBDA_FUNCTION_VERSION"]
        self.invoked_function_arn = os.environ["AWS_LAMBDA_FUNCTION_ARN"]
        self.memory_limit_in_mb = int(os.environ["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"])
        self.log_group_name = os.environ["AWS_LAMBDA_LOG_GROUP_NAME"]
        self.log_stream_name = os.environ["AWS_LAMBDA_LOG_STREAM_NAME"]
        self._deadline = deadline

    def get_remaining_time_in_millis(self):
        return max(int((self._deadline - time.time()) * 1000), 0)


class InitError(Exception):
    """A failure of the Init phase, with the runtime's error type."""

    def __init__(self, error_type, message, exc):
        super().__init__(message)
        self.error_type = error_type
        self.exc = exc


def _send(channel, message):
    channel.write(json.dumps(message, default=str) + "\n")
    channel.flush()


def _error(exc, error_type=None, message=None):
    return {"errorMessage": message or str(exc), "errorType": error_type or type(exc).__name__,
            "stackTrace": traceback.format_tb(exc.__traceback__)}


def _load_handler(spec):
    """Import the handler as awslambdaric does, with its error types."""
    module_name, _, function_name = spec.rpartition(".")
    try:
        module = importlib.import_module(module_name.replace("/", "."))
    except ImportError as exc:
        raise InitError("Runtime.ImportModuleError",
                        f"Unable to import module '{module_name}': {exc}", exc) from exc
    except SyntaxError as exc:
        raise InitError("Runtime.UserCodeSyntaxError",
                        f"Syntax error in module '{module_name}': {exc}", exc) from exc
    except Exception as exc:  # e.g. a required environment variable missing at import
        raise InitError(type(exc).__name__, str(exc), exc) from exc
    handler = getattr(module, function_name, None)
    if handler is None:
        exc = AttributeError(function_name)
        raise InitError("Runtime.HandlerNotFound",
                        f"Handler '{function_name}' missing on module '{module_name}'", exc)
    return handler


def _die_with_the_server():
    """Linux: be killed if the local cloud's server dies (e.g. SIGKILL) while we run."""
    server = os.getppid()
    try:
        import ctypes
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux
    if os.getppid() != server:  # it died before we asked
        os._exit(1)


def main(event_file, result_fd):
    started = time.time()
    _die_with_the_server()
    channel = os.fdopen(os.dup(result_fd), "w")  # dup: not inherited by the handler's children
    os.close(result_fd)
    sys.path[:0] = [os.environ["LAMBDA_TASK_ROOT"], os.environ["LAMBDA_RUNTIME_DIR"]]
    with open(event_file) as handle:
        request = json.load(handle)
    try:
        handler = _load_handler(os.environ["_HANDLER"])
    except InitError as failure:
        print(f"[ERROR] {failure.error_type}: {failure}", flush=True)
        traceback.print_exception(failure.exc, file=sys.stdout)
        sys.stdout.flush()
        outcome = _error(failure.exc, failure.error_type, str(failure))
        outcome["phase"] = "init"
        outcome["initMs"] = (time.time() - started) * 1000
        _send(channel, {"outcome": outcome})
        return 1
    # Init is over: the function's timeout runs from here, as on AWS.
    deadline = time.time() + request["timeout"]
    _send(channel, {"invoked": True})
    context = LambdaContext(request["request_id"], deadline)
    try:
        payload = handler(request["event"], context)
    except Exception as exc:
        print(f"[ERROR] {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(file=sys.stdout)
        sys.stdout.flush()
        _send(channel, {"outcome": _error(exc)})
        return 1
    sys.stdout.flush()
    _send(channel, {"outcome": {"payload": payload}})
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1], int(sys.argv[2]))
    # The invocation is over when the handler returns (Lambda then freezes the
    # environment): no waiting for threads the handler left running, no atexit hooks.
    sys.stdout.flush()
    os._exit(code)
