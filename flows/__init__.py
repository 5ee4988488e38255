"""Prefect flows, DVC stages and MLflow tracking around the `ddpm` package."""
