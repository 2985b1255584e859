"""`batchpilot operator`: run the InferencePolicy operator (kopf, in-process).

Not named cli/operator.py: run as a script, a file's folder leads sys.path,
and that name would shadow the standard library's `operator` module (the
reason operator/ has no __init__.py either).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated

import kopf
import typer

from batchpilot.operator import logs
from batchpilot.operator.config import ConfigError, load_config
from batchpilot.operator.handlers import build_registry


def operator(
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file of operator settings (Prometheus endpoints, namespaces, ...)."
        ),
    ] = None,
    verbose: Annotated[
        bool, typer.Option(help="Log every handler invocation (kopf's verbose mode).")
    ] = False,
) -> None:
    """Run the operator: watch InferencePolicies and their pods, steer the pods' gates.

    Settings come from --config and from BATCHPILOT_OPERATOR_<SETTING> environment
    variables (those win), e.g. BATCHPILOT_OPERATOR_PROMETHEUS_DEFAULT=http://prometheus:9090.
    The Kubernetes API is reached in-cluster, or through KUBECONFIG.
    """
    try:
        settings = load_config(config, os.environ)
    except ConfigError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from err
    kopf.configure(verbose=verbose)
    if not verbose:
        # kopf logs every timer run at INFO: with 100 policies on a 5 s tick
        # that is 20 lines a second saying nothing. Failures stay visible, and
        # what the operator did is in the policies' Events and status.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # On kopf's handler: its warnings and errors repeat every second in an outage.
    logs.install(logging.getLogger())
    liveness = (
        f"http://{settings.health_host}:{settings.health_port}/healthz"
        if settings.health_port
        else None
    )
    kopf.run(
        registry=build_registry(settings),
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=liveness,
        memo=kopf.Memo(),
    )
