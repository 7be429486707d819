"""Run a model-written Python program in a subprocess with limits (HumanEval's pass@1, nanochat/chat_tasks.py).

    result = run_program(source)          # ExecResult: passed / failed / timeout, and the output's tails

The program passes when it runs to its last line and the interpreter exits with 0; a `sys.exit(0)` or
`os._exit(0)` halfway does not count (the runner prints a random marker after the program, checked here).

What is isolated:
- time: a wall-clock limit, after which the child's whole process group is killed; RLIMIT_CPU as a backstop;
- memory: RLIMIT_AS (address space), so a huge allocation raises MemoryError in the child;
- output: stdout and stderr go to files, and RLIMIT_FSIZE caps every file the child writes (a print loop
  cannot fill the parent's memory or the disk); no core dumps;
- network: the child first enters a new user + network namespace (`unshare(CLONE_NEWUSER | CLONE_NEWNET)`,
  Linux when unprivileged user namespaces are allowed), where no interface is up, so no connection leaves
  the machine or reaches its loopback; in any case Python's socket constructors (`socket.socket`,
  `create_connection`, `socketpair`, `fromfd`, and `_socket.socket`) raise before the program runs;
- environment: `python -I` (no PYTHON* variables, user site or current directory on sys.path) with an
  environment of PATH, HOME and LANG only: no proxies, tokens or keys reach the child;
- working directory: a fresh temporary directory, removed afterwards whatever happened.

What is NOT isolated: the file system (the child runs as the same user and can read or write whatever that
user can, outside its directory too, files up to the size cap), processes it starts (they share its limits and
are killed with its process group, unless they start their own session), and, where the namespace cannot be
created (e.g. a container whose seccomp profile forbids unshare), sockets made by other means (ctypes,
a subprocess). This keeps a model's mistakes (a loop that never ends, a huge list, a stray request) from
hanging or breaking an evaluation; it is not a security boundary against deliberately hostile code.
"""

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT_BYTES = 1 << 20  # RLIMIT_FSIZE: the largest file (stdout and stderr included) the child may write
TAIL_CHARS = 2000  # how much of stdout / stderr an ExecResult keeps

# The child's first lines, before the program: limits (soft = hard, so the program cannot raise them), the
# network namespace where the kernel allows it (unshare returns -1, ignored, where not: only the socket block
# is left), the socket block; then the program runs as __main__ and the marker is printed. Done here rather
# than in a preexec_fn, which is unsafe in a parent with threads (torch has several).
# argv: marker, program path, CPU seconds, memory bytes, output bytes.
RUNNER = """
import ctypes, resource, socket, sys, _socket
marker, path, cpu, memory, output = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
del sys.argv[1:]
for limit, value in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, memory), (resource.RLIMIT_FSIZE, output),
                     (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000)  # CLONE_NEWUSER | CLONE_NEWNET
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in this sandbox")
for name in ("socket", "SocketType", "create_connection", "socketpair", "fromfd"):
    setattr(socket, name, _no_network)
_socket.socket = _socket.SocketType = _no_network
with open(path, encoding="utf-8") as f:
    code = compile(f.read(), path, "exec")
exec(code, {"__name__": "__main__"})
sys.stdout.flush()
sys.stdout.write("\\n" + marker + "\\n")
"""


@dataclass
class ExecResult:
    status: str  # "passed", "failed" (an exception, a non-zero exit, or stopped before its end) or "timeout"
    stdout: str  # the last TAIL_CHARS characters, without the runner's marker
    stderr: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_program(source: str, timeout_s: float = 5.0, memory_mb: int = 1024) -> ExecResult:
    """Run `source` as a Python program in a limited subprocess (see the module docstring); never raises for
    anything the program does."""
    marker = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="mc-exec-") as tmp:
        tmp = Path(tmp)
        (tmp / "program.py").write_text(source, encoding="utf-8")
        env = {"PATH": os.defpath, "HOME": str(tmp), "LANG": "C.UTF-8"}
        with open(tmp / "stdout", "wb") as out, open(tmp / "stderr", "wb") as err:
            limits = [str(int(timeout_s) + 1), str(memory_mb << 20), str(OUTPUT_LIMIT_BYTES)]
            child = subprocess.Popen([sys.executable, "-I", "-c", RUNNER, marker, str(tmp / "program.py"), *limits],
                                     cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                     start_new_session=True)
            try:
                returncode = child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                returncode = None
            try:
                os.killpg(child.pid, signal.SIGKILL)  # whatever it left running (its own children) goes too
            except ProcessLookupError:
                pass
            child.wait()
        stdout = (tmp / "stdout").read_text(encoding="utf-8", errors="replace")
        stderr = (tmp / "stderr").read_text(encoding="utf-8", errors="replace")
    finished = stdout.endswith(f"\n{marker}\n")
    stdout = stdout.removesuffix(f"\n{marker}\n")[-TAIL_CHARS:]
    if returncode is None:
        status = "timeout"
    elif returncode == -signal.SIGXCPU:
        status = "timeout"  # CPU time ran out before the wall clock did
    else:
        status = "passed" if returncode == 0 and finished else "failed"
    return ExecResult(status, stdout, stderr[-TAIL_CHARS:])
