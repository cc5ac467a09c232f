"""Process-wide settings live in ``shoal.runtime``: applied inside the context, restored after,
and never changed by a merge on its own."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import shoal.runtime as runtime
from shoal.merge import merge
from shoal.runtime import collection_paused, current, runtime_settings, settle, worker_threads


def _state() -> tuple[int, bool, int]:
    return torch.get_num_threads(), gc.isenabled(), gc.get_freeze_count()


def test_settings_apply_inside_and_are_restored_after() -> None:
    gc.unfreeze()  # `shoal merge` run in-process by other tests freezes at its end, as it does before exiting
    before = _state()
    assert current() == runtime.RuntimeSettings()
    with runtime_settings(threads=1, gc="freeze", trim_allocator=True) as settings:
        assert torch.get_num_threads() == 1 and worker_threads() == 1
        assert gc.get_freeze_count() > 0 and gc.isenabled()
        assert current() is settings and settings.trim_allocator
        kept = [[] for _ in range(10)]  # lists: tracked by the collector
        frozen = gc.get_freeze_count()
        settle()  # objects made since the start are set aside too
        assert gc.get_freeze_count() >= frozen + len(kept)
        with runtime_settings(threads=2):  # the innermost wins, then the outer is back
            assert torch.get_num_threads() == 2 and current().gc == "default"
        assert torch.get_num_threads() == 1
    assert _state() == before


def test_settle_and_defaults_change_nothing_outside_a_context() -> None:
    before = _state()
    settle()
    runtime.chunk_done()
    assert worker_threads() == torch.get_num_threads()
    with collection_paused():
        assert not gc.isenabled()
    assert _state() == before


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="threads"):
        with runtime_settings(threads=0):
            pass
    with pytest.raises(ValueError, match="gc"):
        with runtime_settings(gc="off"):  # type: ignore[arg-type]
            pass


def test_trim_allocator_trims_every_few_chunks(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    calls = []
    monkeypatch.setattr(runtime, "_trim", lambda pad: calls.append(pad))
    for _ in range(3 * runtime.TRIM_EVERY):
        runtime.chunk_done()
    assert calls == []  # not asked for
    with runtime_settings(trim_allocator=True):
        for _ in range(3 * runtime.TRIM_EVERY):
            runtime.chunk_done()
    assert calls == [0, 0, 0]


def test_a_merge_leaves_global_state_as_it_found_it(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    folders = []
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.randn(300, 700, generator=gen)}, str(tmp_path / name / "model.safetensors"))
        folders.append(tmp_path / name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(folders[0]),
                                      "models": [{"model": str(m), "parameters": {"density": 0.5}}
                                                 for m in folders[1:]]}))
    before = _state()
    merge(recipe, tmp_path / "out")
    assert _state() == before


_PROBE = """
import sys
from shoal.merge.fast import load_kernels
from shoal.runtime import runtime_settings
with runtime_settings(numba_blas_probe={probe}):
    kernels = load_kernels()
assert kernels is not None
print("scipy.linalg" in sys.modules, "scipy.linalg.cython_blas" in sys.modules)
import scipy.linalg.cython_blas  # importable as ever once the context is left
"""


@pytest.mark.parametrize("probe", [True, False])
def test_numba_blas_probe_off_skips_scipy_linalg_and_restores_the_import(probe: bool) -> None:
    pytest.importorskip("numba")
    pytest.importorskip("scipy.linalg")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROBE.format(probe=probe)], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    # numba's own import-time probe loads scipy.linalg; with the probe off nothing does, and no
    # placeholder is left behind in sys.modules
    assert done.stdout.split() == (["True", "True"] if probe else ["False", "False"])
