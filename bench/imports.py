"""What a CNI invocation imports: `python3 -X importtime` of a call handed to the node's
CNI server (the client side) and of a standalone ADD, for one or more source trees.

Every module the per-invocation path imports is paid per pod (DESIGN.md, "Dependencies"),
so this lists them; given two trees (`--tree OLD --tree NEW`) it prints what one imports
and the other does not. The trees run from source with Debian's python3 (the bundle's
interpreter), through links named `calico` / `calico-ipam` to one wrapper, so calico-ipam
runs in the plugin's process exactly as with the bundle; the bundle's own bootstrap
modules come on top of these, the same for every tree.

Run as root: .venv/bin/python bench/imports.py [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = "/usr/bin/python3"
PROJECT_PACKAGES = ("cni_plugin", "ipam_plugin", "libcalico", "calicoctl", "calico_node")
POOL = "10.250.0.0/16"
# `-c` puts the working directory first on sys.path: run from the bed's, not a tree.
WRAPPER = """#!/bin/sh
cd {work}
CALICO_EXEC_NAME=$(basename "$0") PYTHONPATH={tree} exec {python} -s -X importtime \\
  -c 'from cni_plugin.entry import main; main()' "$@" 2>>{log}
"""


@dataclass
class Imports:
    """The modules one process imported, in order, with their own import time."""

    modules: dict[str, int]  # name -> self microseconds

    @classmethod
    def parse(cls, stderr: str) -> Imports:
        modules: dict[str, int] = {}
        for line in stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            self_us, _, name = line[len("import time:") :].split("|")
            modules[name.strip()] = int(self_us)
        return cls(modules)

    def project(self) -> list[str]:
        return [m for m in self.modules if m.split(".")[0] in PROJECT_PACKAGES]

    def others(self) -> list[str]:
        return [m for m in self.modules if m.split(".")[0] not in PROJECT_PACKAGES]

    def total_ms(self) -> float:
        return sum(self.modules.values()) / 1000


def sh(*cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


class Bed:
    """A node netns with a pod netns, a local datastore with one pool, and one tree's
    executables as wrappers that log their import times."""

    def __init__(self, tree: Path, work: Path) -> None:
        self.tree = tree
        self.work = work
        tag = uuid.uuid4().hex[:6]
        self.node, self.pod = f"imports-node-{tag}", f"imports-pod-{tag}"
        self.bin = work / "bin"
        self.log = work / "importtime.log"
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LOCAL_DATASTORE_PATH": str(work / "calico.db"),
        }

    def __enter__(self) -> Bed:
        self.bin.mkdir()
        wrapper = self.bin / "calico-wrapper"
        wrapper.write_text(
            WRAPPER.format(work=self.work, tree=self.tree, python=PYTHON, log=self.log)
        )
        wrapper.chmod(0o755)
        for name in ("calico", "calico-ipam"):
            (self.bin / name).symlink_to(wrapper)
        for ns in (self.node, self.pod):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        pool = self.work / "pool.yaml"
        pool.write_text(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bench}\n"
            f"spec: {{cidr: {POOL}, blockSize: 26, natOutgoing: true}}\n"
        )
        venv_site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
        sh(
            PYTHON,
            "-c",
            "from cni_plugin.entry import main; main()",
            "ctl",
            "apply",
            "-f",
            str(pool),
            env={
                **self.env,
                "PYTHONPATH": f"{self.tree}:{venv_site}",
                "CALICO_EXEC_NAME": "calico",
            },
            cwd=self.work,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in (self.pod, self.node):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)

    def cni(self, command: str, socket: str) -> Imports:
        conf = {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "calico",
            "nodename": "imports-node",
            "datastore_type": "local",
            "local_datastore_path": self.env["LOCAL_DATASTORE_PATH"],
            "ipam_lock_file": str(self.work / "ipam.lock"),
            "ipam": {"type": "calico-ipam"},
        }
        env = {
            **self.env,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": "imports0123",
            "CNI_NETNS": f"/var/run/netns/{self.pod}",
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(self.bin),
            "CALICO_AGENT_SOCKET": socket,
        }
        self.log.write_text("")
        proc = subprocess.run(
            ["nsenter", f"--net=/var/run/netns/{self.node}", str(self.bin / "calico")],
            input=json.dumps(conf),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"imports: {command} failed: {proc.stdout} {proc.stderr}")
        return Imports.parse(self.log.read_text())

    def server(self, socket: str) -> subprocess.Popen[bytes]:
        env = {**self.env, "CALICO_AGENT_SOCKET": socket}
        return subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{self.node}", str(self.bin / "calico"), "agent"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def measure(tree: Path) -> dict[str, Imports]:
    with tempfile.TemporaryDirectory(prefix="imports-") as tmp, Bed(tree, Path(tmp)) as bed:
        results = {"standalone ADD": bed.cni("ADD", f"{tmp}/none.sock")}
        bed.cni("DEL", f"{tmp}/none.sock")
        socket_dir = Path(tmp) / "run"
        socket_dir.mkdir(mode=0o700)
        socket = str(socket_dir / "cni.sock")
        server = bed.server(socket)
        try:
            for _ in range(600):
                if os.path.exists(socket):
                    break
                if server.poll() is not None:
                    raise SystemExit("imports: the CNI server exited")
                subprocess.run(["sleep", "0.1"], check=True)
            results["ADD handed to the server (client)"] = bed.cni("ADD", socket)
            bed.cni("DEL", socket)
        finally:
            server.terminate()
            server.wait()
    return results


def report(tree: Path, results: dict[str, Imports]) -> None:
    print(f"== {tree}")
    for case, imports in results.items():
        print(
            f"{case}: {len(imports.modules)} modules, {imports.total_ms():.1f} ms of import "
            f"(self time summed); project modules: {', '.join(imports.project()) or 'none'}"
        )
        print(f"  others: {' '.join(imports.others())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", type=Path, help="source tree (default: this)")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("imports: run as root (network namespaces)", file=sys.stderr)
        return 1
    trees = [t.resolve() for t in opts.tree or [REPO]]
    measured = {tree: measure(tree) for tree in trees}
    for tree, results in measured.items():
        report(tree, results)
    if len(trees) == 2:
        old, new = (measured[t] for t in trees)
        for case in old:
            before = set(old[case].others())
            after = set(new[case].others())
            print(f"{case}: only in {trees[0]}: {sorted(before - after) or 'nothing'}")
            print(f"{case}: only in {trees[1]}: {sorted(after - before) or 'nothing'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
