"""A node agent (`calico agent`) for tests, and the switch that runs whole suites through it.

With CALICO_TEST_VIA_AGENT=1 every simulated node starts an agent inside its netns (and the
session one in the host netns, for the black-box protocol suite); `run_plugin` then points
the executables at the agent of the netns they run in. Each agent must have served a
request if any plugin ran next to it, so a silent fallback to standalone cannot pass.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SWITCH = "CALICO_TEST_VIA_AGENT"
SOCKET_ENV = "CALICO_AGENT_SOCKET"
START_TIMEOUT_S = 120.0  # the agent imports everything once; the test machines are loaded
SERVED = "served CNI request"


def enabled() -> bool:
    return os.environ.get(SWITCH) == "1"


@dataclass
class AgentProcess:
    """One running agent: its socket, its own log, and how many plugin runs targeted it."""

    binary: str
    directory: Path
    netns_path: str | None
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0
    extra_args: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.directory / "agent.sock")

    @property
    def log_path(self) -> Path:
        return self.directory / "agent.log"

    @classmethod
    def start(
        cls,
        binary: str,
        netns_path: str | None = None,
        extra_args: list[str] | None = None,
        directory: Path | None = None,
    ) -> AgentProcess:
        """Start an agent in `netns_path` (else this thread's netns), its socket and log in
        `directory` (else a new short one: AF_UNIX addresses are limited to 108 bytes)."""
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="cagt-", dir="/tmp"))
        else:
            directory.mkdir(mode=0o700)
        agent = cls(binary, directory, netns_path, extra_args=list(extra_args or []))
        agent.launch()
        return agent

    def launch(self) -> None:
        """(Re)start the agent on the same socket and wait until it serves."""
        argv = [self.binary, "agent", "--socket", self.socket, *self.extra_args]
        if self.netns_path:
            argv = ["nsenter", f"--net={self.netns_path}", *argv]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
            )
        self._wait_serving()

    def _wait_serving(self) -> None:
        assert self.proc is not None
        starts = self.log().count("serving CNI requests")
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.log().count("serving CNI requests") <= starts:
            if self.proc.poll() is not None:
                raise RuntimeError(f"calico agent exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"calico agent did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def served(self) -> list[str]:
        """The agent's one log line per request it ran."""
        return [line for line in self.log().splitlines() if SERVED in line]

    def env(self) -> dict[str, str]:
        return {SOCKET_ENV: self.socket}

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 120) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        return self.wait()

    def remove(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


# Agents the switch started, by the netns they serve ("" is the host's).
_serving: dict[str, AgentProcess] = {}


def start_for(binary: str, netns_path: str = "") -> AgentProcess | None:
    """Under the switch, an agent for this netns that run_plugin will route to."""
    if not enabled():
        return None
    agent = AgentProcess.start(binary, netns_path or None)
    _serving[netns_path] = agent
    return agent


def stop_for(netns_path: str = "") -> None:
    """Stop the switch's agent of this netns; it must have served if plugins ran there."""
    agent = _serving.pop(netns_path, None)
    if agent is None:
        return
    try:
        status = agent.stop()
        log = agent.log()
        assert status == 0, f"calico agent exited {status}:\n{log}"
        assert not agent.runs or agent.served(), f"{agent.runs} runs, none via the agent:\n{log}"
    finally:
        agent.remove()


def env_for(netns_path: str | None, env: dict[str, str]) -> dict[str, str]:
    """The environment that points a plugin run at the switch's agent for its netns, unless
    the run names its own socket."""
    agent = _serving.get(netns_path or "")
    if agent is None or SOCKET_ENV in env:
        return {}
    agent.runs += 1
    return agent.env()
