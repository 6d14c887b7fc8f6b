"""The node's BIRD 2: started, watched, restarted when it dies, reloaded, stopped.

Routes must survive every restart (calico-node.md §1.5, feasibility.md §A):
- BIRD runs with `-R` and the kernel protocol has `persist` and `graceful restart`: a
  BIRD that died leaves its routes in the kernel, and the new one prunes nothing until
  its BGP sessions are back.
- The peers are graceful-restart helpers: when this BIRD's sessions drop without a
  Cease (killed) or with BIRD's own `graceful restart` command, they keep its routes for
  the restart time.
- BIRD is its own session, not tied to the daemon: a daemon killed with `kill -9` leaves
  it running, and the next daemon adopts it (found by its pid file, command line and
  answering socket) instead of restarting it. Only a daemon's SIGTERM stops BIRD, with
  `graceful restart`.
Processes are watched through pidfds, which work for an adopted BIRD as for a child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

from calico_node import birdctl
from calico_node.paths import NodePaths

log = logging.getLogger("bird")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.1, 10.0)
STABLE_S = 60.0  # a BIRD that ran this long before dying is restarted without delay


class BirdFailed(Exception):
    """BIRD did not start, or refused a reload."""


def running_bird(paths: NodePaths) -> int | None:
    """The pid of the BIRD serving `paths`' socket, None when none runs. BIRD 2 does not
    lock its pid file, so the pid is believed only if that process is a `bird` with our
    control socket on its command line (pids get reused)."""
    try:
        text = paths.bird_pid_file.read_text().strip()
        argv = Path(f"/proc/{int(text)}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if os.path.basename(argv[0]) != b"bird" or os.fsencode(paths.bird_socket) not in argv:
        return None
    return int(text)


class Bird:
    def __init__(self, paths: NodePaths, binary: str = "bird") -> None:
        self.paths = paths
        self.binary = binary
        self.pid: int | None = None
        self.restarts = 0
        self._child: subprocess.Popen[bytes] | None = None
        self._pidfd: int | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._spawned_at = 0.0

    # -- start / adopt

    @property
    def started(self) -> bool:
        return self._watcher is not None

    def start(self) -> None:
        """Adopt the BIRD a previous daemon left running, or start one; then watch it."""
        with self._lock:
            pid = running_bird(self.paths)
            if pid is not None and self._answers():
                self._watch_pid(pid, None)
                log.info("Adopted the running BIRD (pid %d)", pid)
                with contextlib.suppress(birdctl.BirdError, BirdFailed):
                    self.reload()
            else:
                self._spawn()
            self._watcher = threading.Thread(target=self._watch, name="bird-watch", daemon=True)
            self._watcher.start()

    def _answers(self) -> bool:
        try:
            return birdctl.run(self.paths.bird_socket, "show status", 2.0).ok
        except birdctl.BirdError:
            return False

    def _watch_pid(self, pid: int, child: subprocess.Popen[bytes] | None) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
        self._pidfd = os.pidfd_open(pid)
        self.pid, self._child = pid, child

    def _spawn(self) -> None:
        paths = self.paths
        paths.run_dir.mkdir(parents=True, exist_ok=True)
        paths.log_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            self.binary, "-f", "-R",
            "-c", str(paths.bird_config),
            "-s", str(paths.bird_socket),
            "-P", str(paths.bird_pid_file),
        ]  # fmt: skip
        log_fd = os.open(
            paths.bird_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        try:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,  # outlives a daemon killed with -9 (adopted next start)
                env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")},
            )
        except OSError as err:
            raise BirdFailed(f"cannot start {self.binary}: {err}") from err
        finally:
            os.close(log_fd)
        self._watch_pid(child.pid, child)
        self._spawned_at = time.monotonic()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if child.poll() is not None:
                raise BirdFailed(f"BIRD exited {child.returncode} at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise BirdFailed(f"BIRD did not open {paths.bird_socket}: {self.log_tail()}")
            time.sleep(0.05)
        log.info("Started BIRD (pid %d): %s", child.pid, " ".join(argv))

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.paths.bird_log.read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    # -- watch

    def _exited(self) -> bool:
        """Block until BIRD exits (True) or stop is asked (False)."""
        assert self._pidfd is not None
        readable, _, _ = select.select([self._pidfd, self._wake_r], [], [])
        return self._pidfd in readable and not self._stopping.is_set()

    def _watch(self) -> None:
        delay = RESTART_BACKOFF_S[0]
        while not self._stopping.is_set():
            if not self._exited():
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                status = self._reap()
                log.error(
                    "BIRD (pid %s) exited (%s); restarting it: %s",
                    self.pid,
                    status,
                    self.log_tail(),
                )
                if time.monotonic() - self._spawned_at > STABLE_S:
                    delay = RESTART_BACKOFF_S[0]  # not crash-looping: restart at once
                while not self._stopping.wait(delay):
                    delay = min(delay * 2, RESTART_BACKOFF_S[1])
                    try:
                        self._spawn()
                        self.restarts += 1
                        break
                    except BirdFailed as err:
                        log.error("%s", err)

    def _reap(self) -> str:
        if self._child is not None:
            code = self._child.wait()
            return f"signal {-code}" if code < 0 else f"exit {code}"
        return "adopted process gone"

    # -- control

    def reload(self) -> None:
        """`configure`: BIRD re-reads bird.cfg; only changed protocols restart."""
        try:
            reply = birdctl.run(self.paths.bird_socket, f'configure "{self.paths.bird_config}"')
        except birdctl.BirdError as err:
            raise BirdFailed(f"reload failed: {err}") from err
        if not reply.ok:
            raise BirdFailed(f"BIRD refused the new configuration: {reply.text()}")
        log.info("BIRD reconfigured: %s", reply.lines[-1][1])

    def stop(self) -> None:
        """Leave the routes where they are (`graceful restart`: the kernel keeps them,
        the peers hold them for their restart time) and wait for BIRD to exit."""
        self._stopping.set()
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")
        if self._watcher is not None:
            self._watcher.join(STOP_TIMEOUT_S)
        with self._lock:
            if self._pidfd is None:
                return
            try:
                birdctl.run(self.paths.bird_socket, "graceful restart", 2.0)
            except birdctl.BirdError as err:
                log.warning("BIRD did not take `graceful restart` (%s); sending SIGTERM", err)
                self._signal(signal.SIGTERM)
            if not self._wait_exit(STOP_TIMEOUT_S):
                log.warning("BIRD did not exit; killing it")
                self._signal(signal.SIGKILL)
                self._wait_exit(STOP_TIMEOUT_S)
            if self._child is not None:
                self._child.wait()
            os.close(self._pidfd)
            self._pidfd = None
            log.info("Stopped BIRD (pid %s)", self.pid)

    def _signal(self, signum: int) -> None:
        assert self._pidfd is not None
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self._pidfd, signum)

    def _wait_exit(self, timeout: float) -> bool:
        assert self._pidfd is not None
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)
