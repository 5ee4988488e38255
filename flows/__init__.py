"""Prefect flows, DVC stages and MLflow tracking around the `ddpm` package."""

import os

from ddpm.logs import on_terminal

# Prefect reads these when it is first imported, so they are set here, before any module of flows
# imports it; a value the user has set wins. ddpm's and flows' loggers join the flow run's log (and
# the Prefect UI); the server sends no telemetry (machines offline; it also contends for the SQLite db);
# the ephemeral API gets 120 s to start, not 20: on 2 cores busy with a training it took longer.
PROJECT_LOGGERS = ("ddpm", "flows")
PREFECT_ENV_DEFAULTS = {
    "PREFECT_LOGGING_EXTRA_LOGGERS": ",".join(PROJECT_LOGGERS),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # our loggers outside a flow run (DVC stages, promote) log locally, without a warning
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
for _key, _value in PREFECT_ENV_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
if not on_terminal():  # MLflow's artifact bar, like ours (ddpm.logs), would fill a log with carriage returns
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
