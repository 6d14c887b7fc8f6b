"""Where calico-node keeps its files: Calico's paths, moved together for simulated nodes.

`CALICO_RUN_DIR` (sockets, pid files), `CALICO_LIB_DIR` (files the CNI reads),
`CALICO_CONFD_DIR` (the generated BIRD configuration) and `CALICO_LOG_DIR` default to real
calico-node's directories; several nodes on one machine each get their own set, since
network namespaces do not separate the filesystem. calicoctl's `node status` finds BIRD's
control socket through the same variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodePaths:
    run_dir: Path = Path("/var/run/calico")
    lib_dir: Path = Path("/var/lib/calico")
    confd_dir: Path = Path("/etc/calico/confd")
    log_dir: Path = Path("/var/log/calico")
    nodename_override: str = ""  # CALICO_NODENAME_FILE

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NodePaths:
        env = os.environ if env is None else env
        defaults = cls()

        def chosen(name: str, default: Path) -> Path:
            return Path(env.get(name) or default)

        return cls(
            run_dir=chosen("CALICO_RUN_DIR", defaults.run_dir),
            lib_dir=chosen("CALICO_LIB_DIR", defaults.lib_dir),
            confd_dir=chosen("CALICO_CONFD_DIR", defaults.confd_dir),
            log_dir=chosen("CALICO_LOG_DIR", defaults.log_dir),
            nodename_override=env.get("CALICO_NODENAME_FILE", ""),
        )

    @property
    def nodename_file(self) -> Path:
        return Path(self.nodename_override) if self.nodename_override else self.lib_dir / "nodename"

    @property
    def bird_socket(self) -> Path:
        return self.run_dir / "bird.ctl"

    @property
    def bird_pid_file(self) -> Path:
        return self.run_dir / "bird.pid"

    @property
    def cni_socket(self) -> Path:
        """The CNI fast path's socket (agent_client's default is /var/run/calico's)."""
        return self.run_dir / "cni-agent.sock"

    @property
    def daemon_lock(self) -> Path:
        """Held (flock) by the running calico-node; holds its pid."""
        return self.run_dir / "calico-node.pid"

    @property
    def health_socket(self) -> Path:
        """Where the daemon answers the `-felix-live` / `-felix-ready` probes."""
        return self.run_dir / "health.sock"

    @property
    def bird_config_dir(self) -> Path:
        return self.confd_dir / "config"

    @property
    def bird_config(self) -> Path:
        return self.bird_config_dir / "bird.cfg"

    @property
    def bird_log(self) -> Path:
        return self.log_dir / "bird.log"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`, mode 0644, atomically (readers never see half): written
    to `.<name>.<pid>` beside it first, the directory made if missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
