"""`meddiffuse` command line. Each module below registers its commands onto ``app``."""

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


def main() -> None:
    app()
