"""Training metrics to TensorBoard (default) and MLflow (when enabled), on rank 0 only.

What it does: writes scalars and text (samples) per step; MLflow gets a local SQLite store
beside the run unless `run.mlflow_uri` names another. What it does not do: decide what to
log or when (see `loop.py`), or print (the progress bar does).
"""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig, TrainConfigError


class Logger:
    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool) -> None:
        self.tb = self.mlflow = None
        if not enabled:
            return
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if cfg.run.mlflow:
            import mlflow

            # A local SQLite store beside the run (MLflow 3 retired the plain file store).
            uri = cfg.run.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
            try:
                mlflow.set_tracking_uri(uri)
                if cfg.run.mlflow_uri is None and mlflow.get_experiment_by_name("atlas") is None:
                    # Its artifacts beside the run too: by default a SQLite store puts them
                    # in ./mlruns under whatever folder the command was started from.
                    artifacts = (run_dir / "mlflow-artifacts").resolve().as_uri()
                    mlflow.create_experiment("atlas", artifact_location=artifacts)
                mlflow.set_experiment("atlas")
                mlflow.start_run(run_name=run_dir.name)
                mlflow.log_text(cfg.to_toml(), "config.toml")
            except Exception as e:  # MLflow's own exception types vary with the store
                self.close()
                if mlflow.active_run() is not None:
                    mlflow.end_run()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TrainConfigError(f"MLflow at run.mlflow_uri {uri!r}: {first}") from e
            self.mlflow = mlflow

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()
