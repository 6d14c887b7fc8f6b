"""The two CNI roles, and one invocation of a role run inside this process.

Every CNI invocation runs through `execute`: a one-shot plugin process, each request of the
node agent, and a `calico-ipam` delegate of either. The delegate runs in its caller's
process instead of being exec'd whenever CNI_PATH's `calico-ipam` is this very program
(ipam_exec decides): the exec would cost a second bundle start and the same imports again,
with identical output, errors and side effects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

from cni_plugin import ipam_exec, logs, skel
from cni_plugin.agent_client import IPAM_ROLE, PLUGIN_ROLE

ROLES = (PLUGIN_ROLE, IPAM_ROLE)


def load_role(name: str) -> tuple[str, dict[str, skel.Handler]]:
    """The logging component and the verb handlers of the `calico` or `calico-ipam` role."""
    if name == IPAM_ROLE:
        from ipam_plugin.main import COMPONENT, HANDLERS
    else:
        from cni_plugin.plugin import COMPONENT, HANDLERS
    return COMPONENT, HANDLERS


def execute(
    role: str,
    environ: dict[str, str],
    stdin: Callable[[], bytes],
    stderr: TextIO | None = None,
) -> tuple[skel.Outcome, str]:
    """Run one invocation of `role` on this thread; returns its outcome and the log text it
    wrote (empty when `stderr` took the lines as they came)."""
    if environ.get("CNI_COMMAND") == "VERSION":
        # Answered from the environment and stdin alone: no handler is imported.
        component, handlers = role, {}
    else:
        component, handlers = load_role(role)
    with logs.capture(component, stderr) as request_log:
        outcome = skel.execute(handlers, environ, stdin)
    return outcome, request_log.text()


def run_ipam_delegate(environ: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
    """calico-ipam as a delegate of this process; its log lines join its caller's, as an
    exec'd plugin's stderr would."""
    outcome, _ = execute(IPAM_ROLE, environ, lambda: stdin)
    return outcome.code, outcome.stdout


def delegate_ipam_in_process() -> None:
    ipam_exec.IN_PROCESS[IPAM_ROLE] = run_ipam_delegate
