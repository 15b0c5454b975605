"""The whole platform on one machine without Docker: ``python -m deploy.stack up|down|status|restart``.

See ``deploy/stack/stack.py`` and docs/PLATFORM.md.
"""
