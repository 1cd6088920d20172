"""Run a snippet in a fresh interpreter where TensorFlow cannot be imported (as without the `tf` extra)."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

_HIDE_TENSORFLOW = textwrap.dedent("""
    import importlib.machinery, json, sys
    class HideTensorFlow:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)
        @staticmethod
        def invalidate_caches():
            importlib.machinery.PathFinder.invalidate_caches()
    sys.meta_path[:] = [HideTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
""")


def run_without_tensorflow(body: str) -> dict:
    """Runs `body` (dedented; `json` and `sys` are imported) and returns the JSON its last line prints.

    The result also says whether any tensorflow module got imported ("tf").
    """
    script = _HIDE_TENSORFLOW + textwrap.dedent(body) + textwrap.dedent("""
        print(json.dumps({**result, "tf": any(m.split(".")[0] == "tensorflow" for m in sys.modules)}))
    """)
    root = pathlib.Path(__file__).resolve().parents[2]  # this checkout's packages, not installed ones
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=root,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
