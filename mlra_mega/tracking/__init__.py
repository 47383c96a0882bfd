"""Experiment tracking (MLflow), imported only when tracking is on."""
