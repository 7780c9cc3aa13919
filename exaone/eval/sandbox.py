"""Run untrusted (model-written) Python in a separate, limited process.

Layers, each cheap, together enough for benchmark code (not a security boundary against a
determined attacker; run evals of untrusted models in a container or VM as well):

- a separate process in its own session (the whole process group is killed on the wall timeout)
- `resource.setrlimit` set by a small guard script in the child before the program runs:
  CPU seconds, address space (memory), file size, no core dumps
- a fresh temporary directory as the working directory, removed afterwards
- no network: `unshare -n` (an empty network namespace; `unshare -rn` for non-root) when the
  machine allows it, with a PID namespace (`-p -f --kill-child`) so that processes the program
  detaches die with it; otherwise proxy variables are stripped. The guard also replaces
  `socket.socket` so that a connection attempt fails even where namespaces are unavailable.
- `python -I` (isolated mode: no user site, PYTHON* variables ignored); stdout and stderr go to
  files capped by the file-size limit, so a print loop cannot fill our memory.

This module must not import torch, the engine or the model.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
MAX_OUTPUT_BYTES = 16 << 20     # stdout/stderr file cap (RLIMIT_FSIZE)
KEEP_OUTPUT_CHARS = 1 << 20      # what we read back

_GUARD = r'''
import resource, socket, sys
cpu, mem, fsize = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _no_network(*a, **k):
    raise OSError(101, "network access is disabled in the sandbox")

class _NoSocket(socket.socket):
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if family in (-1, socket.AF_INET, socket.AF_INET6):
            _no_network()
        super().__init__(family, type, proto, fileno)

socket.socket = _NoSocket
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
prog = sys.argv[4]
sys.argv = [prog]
sys.path[0] = "."
del resource, socket, cpu, mem, fsize, _NoSocket
with open(prog, encoding="utf-8") as f:
    code = compile(f.read(), prog, "exec")
exec(code, {"__name__": "__main__", "__file__": prog, "__builtins__": __builtins__})
'''

_PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


@dataclass
class SandboxResult:
    status: str            # "ok", "error" (nonzero exit), "timeout", "memory", "killed"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@functools.lru_cache(maxsize=None)
def network_isolation() -> tuple[str, ...]:
    """The command prefix that gives a child an empty network namespace (and, where possible, a
    PID namespace of its own), or () if none works."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    # With a PID namespace as well (-p -f --kill-child), every process the program starts dies
    # with it, even one that left the process group (setsid, double fork).
    for prefix in ((exe, "-n", "-p", "-f", "--kill-child"), (exe, "-rn", "-p", "-f", "--kill-child"),
                   (exe, "-n"), (exe, "-rn")):
        try:
            r = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return prefix
    return ()


def _clean_env() -> dict:
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "HOME", "TMPDIR", "SYSTEMROOT")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env = {k: v for k, v in env.items() if k.lower() not in _PROXY_VARS}
    env["PYTHONHASHSEED"] = "0"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(KEEP_OUTPUT_CHARS).decode("utf-8", errors="replace")


def run_python(source: str, stdin: str = "", timeout: float = DEFAULT_TIMEOUT_S,
               memory_mb: int | None = DEFAULT_MEMORY_MB, cpu_seconds: float | None = None,
               files: dict[str, str] | None = None) -> SandboxResult:
    """Run `source` as a script with `stdin`; returns its status, outputs and wall time.

    `timeout` is wall-clock seconds (the process group is killed after it); the CPU limit
    defaults to the same number of seconds. `memory_mb` limits the address space (None: none).
    `files` are extra files written next to the program.
    """
    work = tempfile.mkdtemp(prefix="exaone-sandbox-")
    try:
        prog = os.path.join(work, "main.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(source)
        for name, text in (files or {}).items():
            with open(os.path.join(work, os.path.basename(name)), "w", encoding="utf-8") as f:
                f.write(text)
        guard = os.path.join(work, "_guard.py")
        with open(guard, "w", encoding="utf-8") as f:
            f.write(_GUARD)
        with open(os.path.join(work, "_stdin"), "w", encoding="utf-8") as f:
            f.write(stdin)
        cpu = int(cpu_seconds if cpu_seconds is not None else max(1.0, timeout)) + 1
        mem = 0 if memory_mb is None else int(memory_mb) << 20
        cmd = [*network_isolation(), sys.executable, "-I", guard, str(cpu), str(mem), str(MAX_OUTPUT_BYTES), "main.py"]
        out_p, err_p = os.path.join(work, "_stdout"), os.path.join(work, "_stderr")
        t0 = time.perf_counter()
        with open(os.path.join(work, "_stdin"), "rb") as fin, open(out_p, "wb") as fout, open(err_p, "wb") as ferr:
            proc = subprocess.Popen(cmd, cwd=work, stdin=fin, stdout=fout, stderr=ferr, env=_clean_env(),
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the program's children too
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        dt = time.perf_counter() - t0
        stdout, stderr = _read(out_p), _read(err_p)
        rc = proc.returncode
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL) and dt >= timeout * 0.9:
            status = "timeout"
        elif rc == 0:
            status = "ok"
        elif "MemoryError" in stderr[-2000:] or rc == -signal.SIGSEGV and mem:
            status = "memory"
        elif rc is not None and rc < 0:
            status = "timeout" if rc == -signal.SIGXCPU else "killed"
        else:
            status = "error"
        return SandboxResult(status, rc, stdout, stderr, dt)
    finally:
        shutil.rmtree(work, ignore_errors=True)
