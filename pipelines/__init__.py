"""Stage entry points and orchestration (DVC stages, Ray, MLflow, S3)."""
