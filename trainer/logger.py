"""Training metrics to TensorBoard (default) and MLflow (when enabled), on rank 0 only.

What it does: writes scalars and text (samples) per step; MLflow gets a local SQLite store
beside the run unless `run.mlflow_uri` names another, the config as parameters and as a
file. A resumed run continues its own records: TensorBoard drops the points the stopped
run logged after its last checkpoint (they are logged again), and MLflow logs into the
same MLflow run (its id is kept in RUN/mlflow_run_id). `check_logging_packages` refuses,
before a run writes anything, a backend whose package is not installed. What it does not
do: decide what to log or when (see `loop.py`), or print (the progress bar does).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import msgspec

from atlas_server.io import atomic_write_text

from .config import TrainConfig, TrainConfigError

RUN_ID_FILE = "mlflow_run_id"


def check_logging_packages(cfg: TrainConfig) -> None:
    """Import each enabled backend now: missing, it is a one-line error, not a traceback
    once the run folder exists."""
    wanted = [
        ("run.tensorboard", cfg.run.tensorboard, "tensorboard", "tensorboard"),
        ("run.mlflow", cfg.run.mlflow, "mlflow", "'atlas-llm[mlflow]'"),
    ]
    for setting, enabled, module, package in wanted:
        if not enabled:
            continue
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise TrainConfigError(
                f"{setting} = true needs the {module} package, which cannot be imported ({e}): "
                f"pip install {package}, or set {setting} = false"
            ) from None


class Logger:
    def __init__(self, cfg: TrainConfig, run_dir: Path, enabled: bool, resumed_at: int = 0) -> None:
        """`resumed_at`: the step a resumed run continues from (0 for a new run)."""
        self.tb = self.mlflow = None
        if not enabled:
            return
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Points after the checkpoint were logged by the stopped run and come again.
            purge = resumed_at + 1 if resumed_at else None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if cfg.run.mlflow:
            self._start_mlflow(cfg, run_dir, resumed_at)

    def _start_mlflow(self, cfg: TrainConfig, run_dir: Path, resumed_at: int) -> None:
        import mlflow

        # A local SQLite store beside the run (MLflow 3 retired the plain file store).
        uri = cfg.run.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        id_file = run_dir / RUN_ID_FILE
        try:
            mlflow.set_tracking_uri(uri)
            if cfg.run.mlflow_uri is None and mlflow.get_experiment_by_name("atlas") is None:
                # Its artifacts beside the run too: by default a SQLite store puts them
                # in ./mlruns under whatever folder the command was started from.
                artifacts = (run_dir / "mlflow-artifacts").resolve().as_uri()
                mlflow.create_experiment("atlas", artifact_location=artifacts)
            mlflow.set_experiment("atlas")
            previous = _existing_run(mlflow, id_file) if resumed_at else None
            if previous is not None:
                mlflow.start_run(run_id=previous)
            else:
                run = mlflow.start_run(run_name=run_dir.name)
                atomic_write_text(id_file, run.info.run_id + "\n")
                # Parameters are write-once in MLflow: a resumed run keeps the first ones
                # (the settings it changed are in its config.toml and the trainer's log).
                mlflow.log_params(_params(cfg))
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


def _existing_run(mlflow, id_file: Path) -> str | None:
    """The run id this folder's first start recorded, if the tracking store still has it
    (another `run.mlflow_uri` on resume holds no such run: a new one starts there)."""
    try:
        run_id = id_file.read_text().strip()
        mlflow.get_run(run_id)
    except Exception:  # no file, or a store without that run: MLflow's types vary
        return None
    return run_id


def _params(cfg: TrainConfig) -> dict[str, str]:
    """The config as MLflow parameters, `section.key` = value, comparable across runs."""
    return {
        f"{section}.{key}": str(value)
        for section, values in msgspec.to_builtins(cfg).items()
        for key, value in values.items()
    }
