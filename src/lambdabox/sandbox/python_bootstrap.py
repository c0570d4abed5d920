"""The script a Python function's interpreter runs: awslambdaric's entry point, handler from ``_HANDLER``.

Runs inside the function's own interpreter (any python3.9+, never imported by lambdabox), like Lambda's
/var/runtime/bootstrap.py, so wrapper scripts can rewrite ``_HANDLER`` and insert flags before this path.
"""

import os
import sys


def _drop_own_directory() -> None:
    # Python puts a script's directory first on sys.path. Here that is lambdabox's own package directory,
    # which must not shadow the function's modules (a handler module named ``runtime`` or ``environ``).
    here = {os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.realpath(__file__))}
    sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) not in here]


def main() -> None:
    _drop_own_directory()
    task_root = os.environ.get("LAMBDA_TASK_ROOT", "/var/task")
    # Lambda imports the function's code from the task root first, whatever PYTHONPATH says.
    if task_root not in sys.path:
        sys.path.insert(0, task_root)
    # awslambdaric lives in the runtime dir; keep it importable when the function overrides PYTHONPATH.
    runtime_dir = os.environ.get("LAMBDA_RUNTIME_DIR")
    if runtime_dir and runtime_dir not in sys.path:
        sys.path.append(runtime_dir)
    # awslambdaric's own __main__ takes the app root from the working directory (3.x) and the handler
    # from argv[1]; call it exactly as ``python -m awslambdaric <handler>`` would run it.
    os.chdir(task_root)
    from awslambdaric.__main__ import main as awslambdaric_main

    awslambdaric_main([sys.argv[0], os.environ.get("_HANDLER", "")])


if __name__ == "__main__":
    main()
