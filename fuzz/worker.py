"""Cases run in a child process, so that a native crash or a hang ends the case, not the run.

``Worker.run(case)`` sends the case number to a ``python -m fuzz --worker`` child and reads back
its ``Outcome`` as one JSON line. When the child dies (a segfault, an abort in the allocator) the
case is a ``native_crash`` with the tail of the child's stderr; past ``timeout`` seconds it is
killed and the case is a ``timeout``. Either way the case is tried once more without the pass
(the line "N plain": ``run.run_plain``) in a fresh child, to tell torch's crashes from ours, and a
fresh child takes the next case.
"""
from __future__ import annotations

import json
import os
import pathlib
import select
import subprocess
import sys
import tempfile
import time

from .program import generate
from .run import Outcome, run_case, run_plain

PREFIX = b"@@fuzz-outcome@@ "
ROOT = pathlib.Path(__file__).resolve().parent.parent


def serve(tol: float, attribute: bool = False) -> None:
    """The child's loop: a case number per line on stdin ("N" or "N plain"), an outcome per line out."""
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)                 # anything else printed goes to stderr, not into the protocol
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        case = int(words[0])
        if words[1:] == ["plain"]:
            reply = {"case": case, "plain_failed": run_plain(case, tol)}
        else:
            reply = run_case(case, tol, attribute).to_json()
        out.write(PREFIX + json.dumps(reply).encode() + b"\n")


class Worker:
    def __init__(self, tol: float, timeout: float = 600.0, attribute: bool = False, force=()):
        self.tol, self.timeout, self.attribute, self.force = tol, timeout, attribute, list(force)
        self.proc = None

    def _start(self):
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("TRITON_INTERPRET", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "fuzz", "--worker", "--tol", repr(self.tol)]
                                     + (["--attribute"] if self.attribute else [])
                                     + [arg for f in self.force for arg in ("--force", f)],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=env, bufsize=0)
        self.buffer = b""

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _ask(self, line: str):
        """The child's reply to one line, or ("died", stderr tail) / ("timeout", "")."""
        if self.proc is None:
            self._start()
        self.proc.stdin.write(line.encode() + b"\n")
        deadline = time.monotonic() + self.timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                if raw.startswith(PREFIX):
                    return "ok", json.loads(raw[len(PREFIX):])
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                return "timeout", f"no result after {self.timeout:.0f} s"
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait()
                    code = self.proc.returncode
                    self.stderr.seek(0)
                    tail = self.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
                    self.proc = None
                    return "died", f"the process died (exit status {code}): {' | '.join(tail)}"
                self.buffer += chunk

    def run(self, case: int) -> Outcome:
        start = time.perf_counter()
        status, reply = self._ask(str(case))
        if status == "ok":
            return Outcome.from_json(reply)
        verdict = "native_crash" if status == "died" else "timeout"
        outcome = Outcome(generate(case), verdict, reply, seconds=time.perf_counter() - start)
        status, plain = self._ask(f"{case} plain")
        outcome.upstream = status != "ok" or plain["plain_failed"]
        return outcome
