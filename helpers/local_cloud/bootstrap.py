"""The Lambda runtime's bootstrap, run by the local executor in a fresh interpreter.

Standard library only: it runs under ``python -I -S``, with the function's task directory
(the extracted zip) and the runtime directory (boto3) as the only places to import from,
like ``/var/task`` and ``/var/runtime`` on AWS. Usage: ``bootstrap.py CONTROL_DIR``, where
CONTROL_DIR holds ``event.json``; the outcome is written to ``result.json``.
"""
import importlib
import json
import os
import sys
import time
import traceback


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


def _write(control, outcome):
    partial = os.path.join(control, "result.json.partial")
    with open(partial, "w") as handle:
        json.dump(outcome, handle, default=str)
    os.replace(partial, os.path.join(control, "result.json"))


def _error(exc, error_type=None):
    return {"errorMessage": str(exc), "errorType": error_type or type(exc).__name__,
            "stackTrace": traceback.format_tb(exc.__traceback__)}


def main(control):
    sys.path[:0] = [os.environ["LAMBDA_TASK_ROOT"], os.environ["LAMBDA_RUNTIME_DIR"]]
    with open(os.path.join(control, "event.json")) as handle:
        request = json.load(handle)
    module_name, _, function_name = os.environ["_HANDLER"].rpartition(".")
    try:
        handler = getattr(importlib.import_module(module_name), function_name)
    except Exception as exc:  # what Lambda reports when the zip is broken
        outcome = _error(exc, "Runtime.ImportModuleError")
        outcome["errorMessage"] = f"Unable to import module '{module_name}': {exc}"
        print(f"[ERROR] Runtime.ImportModuleError: {outcome['errorMessage']}", flush=True)
        _write(control, outcome)
        return 1
    # Init is over: the function's timeout runs from here, as on AWS.
    deadline = time.time() + request["timeout"]
    open(os.path.join(control, "invoked"), "w").close()
    context = LambdaContext(request["request_id"], deadline)
    try:
        payload = handler(request["event"], context)
    except Exception as exc:
        print(f"[ERROR] {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc(file=sys.stdout)
        _write(control, _error(exc))
        return 1
    sys.stdout.flush()
    _write(control, {"payload": payload})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
