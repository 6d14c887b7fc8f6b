"""The one entry point of the bundle: the role comes from the executable's name.

As real Calico's binary does: invoked as `calico-ipam` it is the IPAM plugin, otherwise
the `calico` plugin, which without CNI_COMMAND is the admin CLI. The launcher scripts in
dist/bin pass the name they were invoked as in CALICO_EXEC_NAME, because the PyInstaller
bundle itself always sees its own name.
"""

from __future__ import annotations

import os
import sys

IPAM_NAME = "calico-ipam"


def role() -> str:
    return os.environ.get("CALICO_EXEC_NAME") or os.path.basename(sys.argv[0])


def main() -> None:
    if role() == IPAM_NAME:
        from ipam_plugin.main import main as ipam_main

        sys.exit(ipam_main())
    if not os.environ.get("CNI_COMMAND"):
        from cni_plugin.cli import main as cli_main

        sys.exit(cli_main(sys.argv[1:]))
    from cni_plugin import logs, skel
    from cni_plugin.plugin import COMPONENT, HANDLERS

    logs.setup(COMPONENT)
    sys.exit(skel.run(HANDLERS))


if __name__ == "__main__":
    main()
