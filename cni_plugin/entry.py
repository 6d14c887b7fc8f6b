"""The one entry point of the bundle: the role comes from the executable's name.

As real Calico's binary does: invoked as `calico-ipam` it is the IPAM plugin; as
`calico-node` the node daemon (or its probes); as `calicoctl` or `kubectl-calico` the
operator's CLI; as `calico-kube-controllers` the cluster's controllers (IPAM garbage
collection); otherwise the `calico` plugin, which without CNI_COMMAND is the same CLI
(`calico agent` runs the CNI server alone). The
executables are symlinks to the bundle's executable, whose argv[0] keeps the link's name.

A CNI invocation first tries the node agent (agent_client, builtins only); when none
answers, this process does the whole job, importing only what the verb needs. Nothing
but builtins may be imported at module level here.
"""

import posix
import sys

from cni_plugin import agent_client
from cni_plugin.agent_client import IPAM_ROLE, PLUGIN_ROLE

CLI_NAMES = ("calicoctl", "kubectl-calico")
KUBE_CONTROLLERS_NAME = "calico-kube-controllers"
NODE_NAME = "calico-node"


def run_standalone(name: str, stdin: bytes | None = None) -> int:
    """The whole invocation in this process (`stdin` when it was already read)."""
    import os

    from cni_plugin import logs, roles, skel

    logs.route_requests(name)
    roles.delegate_ipam_in_process()
    reader = skel.read_stdin if stdin is None else lambda: stdin
    outcome, _ = roles.execute(name, dict(os.environ), reader, sys.stderr)
    return _print(outcome.code, outcome.stdout)


def _print(code: int, stdout: bytes) -> int:
    sys.stdout.buffer.write(stdout)
    sys.stdout.flush()
    return code


def recover_lost_add(name: str, stdin: bytes) -> int:
    """The agent took an ADD and went away without answering: it may have done any part of
    it. Undo it with a DEL (idempotent) and tell the runtime to retry (code 11), rather than
    redo it here and risk a second allocation."""
    import os

    from cni_plugin import logs, roles, skel
    from cni_plugin.types import ERR_TRY_AGAIN_LATER, CNIError

    log = logs.route_requests(name)
    roles.delegate_ipam_in_process()
    environ = dict(os.environ)
    undo, _ = roles.execute(name, {**environ, "CNI_COMMAND": "DEL"}, lambda: stdin, sys.stderr)
    undone = "undone" if undo.code == 0 else f"undo failed: {undo.stdout.decode().strip()}"
    log.error("the calico node agent went away during ADD; %s", undone)

    def try_again(req: skel.Request) -> None:
        raise CNIError(
            ERR_TRY_AGAIN_LATER,
            "the calico node agent went away while handling ADD; try again",
            f"partial work {undone}",
        )

    answer = skel.execute({"ADD": try_again}, environ, lambda: stdin)
    return _print(answer.code, answer.stdout)


def run_command_line(name: str, argv: list[str]) -> int:
    """Not a CNI invocation: the node daemon, the operator's CLI, or the CNI server."""
    if name == NODE_NAME:
        from calico_node.main import main as node_main

        return node_main(argv)
    if name not in CLI_NAMES and argv[:1] == ["agent"]:
        from calico_node.cni_server import main as serve

        return serve(argv[1:])
    from calicoctl.cli import main as cli_main

    return cli_main(argv, prog=name if name in CLI_NAMES else "calico")


def main() -> None:
    name = agent_client.exec_name()
    if name == KUBE_CONTROLLERS_NAME:
        from kube_controllers.main import main as controllers_main

        sys.exit(controllers_main(sys.argv[1:]))
    command = posix.environ.get(b"CNI_COMMAND")
    if name in (*CLI_NAMES, NODE_NAME) or (name != IPAM_ROLE and not command):
        sys.exit(run_command_line(name, sys.argv[1:]))
    stdin = None
    if command:
        handoff = agent_client.hand_off((IPAM_ROLE if name == IPAM_ROLE else PLUGIN_ROLE).encode())
        if handoff.code is not None:
            posix._exit(handoff.code)  # everything went out through posix.write already
        if handoff.lost and command == b"ADD":
            sys.exit(recover_lost_add(name, handoff.stdin or b""))
        stdin = handoff.stdin
    sys.exit(run_standalone(name, stdin))


if __name__ == "__main__":
    main()
