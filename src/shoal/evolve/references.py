"""A finished ``shoal evolve`` run folder stands for its merged model.

Registered with :mod:`shoal.checkpoint.references` as the ``evolve_run`` folder rule (entry
point ``shoal.folder_rules``), so that a run folder can be given wherever a model is expected
(PS+DFS feeds a PS run to DFS). Import-light: nothing but the standard library.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"  # what the run was asked to do
MODEL_DIR = "model"  # the final merged model inside a run folder


def run_folder_model(folder: Path) -> Path | None:
    """``folder/model`` when ``folder`` is a finished run folder (its config and model are
    there), else None."""
    folder = Path(folder)
    model = folder / MODEL_DIR
    if (folder / CONFIG_FILE).is_file() and model.is_dir():
        return model
    return None
