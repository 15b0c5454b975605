"""Prefect flows for meddiffuse: thin doors onto ``meddiffuse.tasks``.

``generate_dataset`` (shards as mapped tasks), ``train_classifier``, ``study`` (the protocol for one or more
domains) and ``promote``; the heavy steps run through a backend (``flows.backends``): in this process
(the default, and what a Kubernetes job on a GPU node runs) or on the BentoML generator/trainer services.

The library never imports this package; ``meddiffuse flow ...`` is plugged in through the ``meddiffuse.cli``
entry point (``flows.cli:flow_app``). Import the flows from their modules (``flows.study`` etc.): this
package stays import-light so that the CLI and ``prefect deploy`` start fast.
"""
