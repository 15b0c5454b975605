"""Errors the generator raises for requests it cannot honour; the CLI turns them into ``fail(...)``."""

from __future__ import annotations


class InvalidGeneratorRequest(ValueError):
    """A request that can never succeed as asked (bad count, steps, sampler, class, resolution...)."""


class IncompatibleGenerator(InvalidGeneratorRequest):
    """The generator was trained for another domain, class list or resolution than the request needs."""


class GeneratorNotFound(FileNotFoundError):
    """No committed generator (model folder with its ``generator.json``) at the given reference."""


class CheckpointMismatch(InvalidGeneratorRequest):
    """A checkpoint exists but was made with a different recipe, so resuming from it would be wrong."""
