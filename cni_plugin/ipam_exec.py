"""Running the IPAM plugin named by `ipam.type` from CNI_PATH (libcni's invoke package).

The delegate gets our exact stdin and environment with only CNI_COMMAND replaced, and
`IgnoreUnknown=1` prepended to CNI_ARGS as Calico does, so plugins that parse CNI_ARGS
strictly (host-local) accept the Kubernetes keys. Its error JSON is passed through unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from cni_plugin.skel import Request
from cni_plugin.types import (
    ERR_DECODE,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_TRY_AGAIN_LATER,
    CNIError,
    Result,
    parse_result,
)

log = logging.getLogger(__name__)

# Calico's IPAM gives itself 90 s after taking the host lock; leave room for the lock wait.
EXEC_TIMEOUT_S = 150.0
SELF_TYPE = "calico"

# Runs a delegate inside this process: (environment, stdin) -> (exit code, stdout).
InProcessRunner = Callable[[dict[str, str], bytes], tuple[int, bytes]]
# Plugin types run in this process instead of exec'd, when CNI_PATH's binary is this very
# program (roles.delegate_ipam_in_process registers calico-ipam): the exec would cost a
# second bundle start and the same imports again.
IN_PROCESS: dict[str, InProcessRunner] = {}


def find_plugin(plugin_type: str, path: list[str]) -> str:
    """The first regular file named `plugin_type` in the CNI_PATH directories."""
    if os.sep in plugin_type:
        raise CNIError(ERR_INVALID_CONFIG, f'invalid plugin name "{plugin_type}"')
    for directory in path:
        candidate = os.path.join(directory, plugin_type)
        if os.path.isfile(candidate):
            return candidate
    raise CNIError(
        ERR_INVALID_CONFIG,
        f'failed to find plugin "{plugin_type}" in path {json.dumps(path)}',
        "install the IPAM plugin into a CNI_PATH directory or fix ipam.type",
    )


def delegate_env(command: str, req: Request) -> dict[str, str]:
    """The request's own environment (not this process's: the agent serves many callers)."""
    env = dict(req.environ)
    env["CNI_COMMAND"] = command
    args = env.get("CNI_ARGS", "")
    if not args.startswith("IgnoreUnknown=1"):
        args = "IgnoreUnknown=1;" + args if args else "IgnoreUnknown=1"
    env["CNI_ARGS"] = args
    return env


def exec_plugin(plugin_type: str, command: str, req: Request, stdin: bytes | None = None) -> bytes:
    """Run the delegate; returns its stdout, raises its error (or ours) as CNIError."""
    binary = find_plugin(plugin_type, req.path)
    data = req.stdin if stdin is None else stdin
    runner = IN_PROCESS.get(plugin_type)
    if runner is not None and _is_our_bundle(binary, req.path):
        code, out = runner(delegate_env(command, req), data)
        if code != 0:
            raise _delegate_error(plugin_type, out)
        return out
    return _exec(binary, plugin_type, command, delegate_env(command, req), data)


def _exec(binary: str, plugin_type: str, command: str, env: dict[str, str], data: bytes) -> bytes:
    import subprocess  # ~7 ms: only a delegate that is not this program needs it

    try:
        proc = subprocess.run(
            [binary],
            input=data,
            stdout=subprocess.PIPE,
            env=env,
            timeout=EXEC_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CNIError(
            ERR_TRY_AGAIN_LATER,
            f"IPAM plugin {plugin_type} {command} timed out after {exc.timeout:.0f}s",
        ) from exc
    except OSError as exc:
        raise CNIError(ERR_INTERNAL, f"failed to run IPAM plugin {binary}: {exc}") from exc
    if proc.returncode != 0:
        raise _delegate_error(plugin_type, proc.stdout)
    return proc.stdout


def _is_our_bundle(binary: str, path: list[str]) -> bool:
    """True when `binary` is the same program as the `calico` on this CNI_PATH (both are
    links to one bundle executable)."""
    try:
        return os.path.samefile(binary, find_plugin(SELF_TYPE, path))
    except (CNIError, OSError):
        return False


def _delegate_error(plugin_type: str, stdout: bytes) -> CNIError:
    try:
        doc = json.loads(stdout)
        return CNIError(int(doc["code"]), str(doc.get("msg", "")), str(doc.get("details", "")))
    except (ValueError, KeyError, TypeError):
        text = stdout.decode(errors="replace").strip()
        return CNIError(
            ERR_INTERNAL,
            f"netplugin {plugin_type} failed but error parsing its diagnostic message",
            text,
        )


def add(plugin_type: str, req: Request, version: str) -> Result:
    out = exec_plugin(plugin_type, "ADD", req)
    try:
        doc = json.loads(out)
    except ValueError as exc:
        raise CNIError(
            ERR_DECODE, f"IPAM plugin {plugin_type} printed invalid JSON: {exc}"
        ) from exc
    result = parse_result(doc, version)
    if not result.ips:
        raise CNIError(ERR_INTERNAL, "IPAM plugin returned missing IP config")
    return result


def release_after_failure(plugin_type: str, req: Request) -> None:
    """Undo an IPAM ADD when a later step failed; never hides the original error."""
    try:
        exec_plugin(plugin_type, "DEL", req)
    except CNIError as err:
        log.error("IPAM DEL after a failed ADD also failed: %s", err)
