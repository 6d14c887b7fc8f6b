"""confd's rendering cycle: templates + data -> staged files -> `bird -p` -> swapped in.

As Calico's confd (calico-node.md §1.1): nothing is written when the text is unchanged; a
changed set is staged beside the destination, checked with BIRD's parser, and only then
renamed over the files in use (the included files first, bird.cfg last), so the running
BIRD never sees a half-written or rejected configuration.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import jinja2

from calico_node.confd.bgp import BirdView

TEMPLATES = Path(__file__).with_name("templates")
MAIN = "bird.cfg"
# Written in this order: bird.cfg includes the other two.
FILES = ("bird_aggr.cfg", "bird_ipam.cfg", MAIN)
CHECK_TIMEOUT_S = 30.0


class ConfigRejected(Exception):
    """BIRD's parser refused the rendered configuration (a bug, or bad resource data)."""


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


def render(view: BirdView) -> dict[str, str]:
    """The three files' text for `view`."""
    env = _environment()
    return {name: env.get_template(f"{name}.j2").render(v=view) for name in FILES}


def bird_check(config: Path, bird: str = "bird") -> None:
    """`bird -p -c config`: parse only (the includes beside it too)."""
    try:
        proc = subprocess.run(
            [bird, "-p", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ConfigRejected(f"cannot run {bird} -p: {err}") from err
    if proc.returncode != 0:
        raise ConfigRejected((proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}")


class ConfigWriter:
    """The files in `directory` (CALICO_CONFD_DIR/config), replaced only by checked sets."""

    def __init__(self, directory: Path, bird: str = "bird") -> None:
        self.directory = directory
        self.bird = bird

    def current(self, name: str) -> str | None:
        try:
            return (self.directory / name).read_text()
        except OSError:
            return None

    def write(self, files: dict[str, str]) -> bool:
        """Put `files` in place; False when they are what is there already."""
        changed = [name for name in FILES if self.current(name) != files[name]]
        if not changed:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        stage = self.directory / f".stage-{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(mode=0o755)
        try:
            for name in FILES:
                (stage / name).write_text(files[name])
            bird_check(stage / MAIN, self.bird)
            for name in changed:
                os.replace(stage / name, self.directory / name)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return True
