"""`meddiffuse` command line. Each module below registers its commands onto ``app``.

Doors outside the library (``flows/`` adds ``meddiffuse flow ...``) plug in through the entry-point group
``meddiffuse.cli`` — each entry a ``typer.Typer`` added under its name — so the library never imports them.
"""

import importlib.metadata
import logging

from meddiffuse.cli import (
    audit,  # noqa: F401,E402
    classify,  # noqa: F401,E402
    data,  # noqa: F401,E402  (ingest, phantom, datasets)
    explain,  # noqa: F401,E402
    generate,  # noqa: F401,E402
    models,  # noqa: F401,E402
    study,  # noqa: F401,E402  (experiment)
)
from meddiffuse.cli.app import app

__all__ = ["app"]

log = logging.getLogger(__name__)


def _load_plugins() -> None:
    for entry in importlib.metadata.entry_points(group="meddiffuse.cli"):
        try:
            sub_app = entry.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the core commands
            log.warning("cannot load command group %r (%s): %s", entry.name, entry.value, exc)
            continue
        app.add_typer(sub_app, name=entry.name)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _load_plugins()
    app()
