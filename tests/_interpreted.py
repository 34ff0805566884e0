"""Run kernel checks in Triton's interpreter: a child Python process with TRITON_INTERPRET=1 (it must be set before
triton is imported, so the parent test process cannot use it)."""

import os
import subprocess
import sys


def run_interpreted(code: str) -> subprocess.CompletedProcess:
    """`python -c code` under TRITON_INTERPRET=1; stdout and stderr captured as text."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
