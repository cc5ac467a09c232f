"""Checks of the paths and devices a command is given, made before any work starts.

click's own ``Path(exists=True)`` checks report a file that is missing or a folder where a
file belongs as a three-line usage error (exit 64); a path that does not work is bad data,
so the commands take plain paths and check them here: one line naming the flag and the path,
exit 2 (a :class:`~shoal.errors.ConfigError`).
"""

from __future__ import annotations

from pathlib import Path

import click

from shoal.errors import ConfigError

FILE = click.Path(path_type=Path)  # a path checked by the command (metavar PATH in --help)


def _blocking_file(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (so nothing can be made under it)."""
    for parent in reversed(path.absolute().parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def check_output_file(path: Path, flag: str) -> Path:
    """``path`` can be written as a file: it is not a folder and no ancestor is a file."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise ConfigError(f"{flag} {path}: {blocking} is a file, not a folder")
    return path


def check_output_folder(path: Path, flag: str) -> Path:
    """``path`` is a folder or can be made one."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder")
    blocking = _blocking_file(path)
    if blocking is not None:
        raise ConfigError(f"{flag} {path}: {blocking} is a file, not a folder")
    return path


def check_expert_output(path: Path, flag: str = "--out") -> Path:
    """``path`` can take an SVF expert: writable as a file, and if it exists, an expert already
    (another file there, a model's weights say, is not overwritten)."""
    from shoal.adapt.expert import METADATA_KEY

    check_output_file(path, flag)
    if path.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                is_expert = METADATA_KEY in (f.metadata() or {})
        except Exception:  # noqa: BLE001 -- any file safetensors cannot read is not an expert
            is_expert = False
        if not is_expert:
            raise ConfigError(f"{flag} {path} exists and is not an SVF expert; remove it or choose another {flag}")
    return path


def check_input_file(path: Path, flag: str) -> Path:
    """``path`` is an existing file."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, not a file")
    if not path.exists():
        raise ConfigError(f"{flag} {path} does not exist")
    return path


def check_device(device: str) -> str:
    """``device`` names a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a device; use cpu, cuda, cuda:N, mps or xpu") from None
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"--device {device}: shoal runs on cpu, cuda, mps or xpu")
    if parsed.type == "cpu":
        return device
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps, "xpu": getattr(torch, "xpu", None)}[parsed.type]
    if backend is None or not backend.is_available():
        raise ConfigError(f"--device {device}: {parsed.type.upper()} is not available on this machine")
    if parsed.index is not None and parsed.type in ("cuda", "xpu") and parsed.index >= backend.device_count():
        raise ConfigError(f"--device {device}: this machine has {backend.device_count()} {parsed.type} device(s)")
    return device


DTYPES = ("float32", "bfloat16", "float16")


def model_run_options(function):  # type: ignore[no-untyped-def]
    """The options of every command that loads MODEL to train or adapt SVF experts:
    ``--task-seed``, ``--svd-cache``, ``--device``, ``--dtype``, ``--json``, ``--revision`` /
    ``--token``, ``--threads`` and ``-q`` / ``-v``."""
    from shoal.cli._options import hub_options, threads_option, verbosity

    function = verbosity(threads_option(hub_options(function)))
    for option in reversed([
        click.option("--task-seed", type=int, default=None,
                     help="seed of zoo task splits (default: the seed of MODEL's zoo world, else 0)"),
        click.option("--svd-cache", type=FILE, default=None,
                     help="SVD cache folder (default: $SHOAL_CACHE/svd or ~/.cache/shoal/svd)"),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1, ..."),
        click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True),
        click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object"),
    ]):
        function = option(function)
    return function


def prepare_model_run(model: str, revision: str | None, token: str | None, threads: int, device: str,
                      svd_cache: Path | None) -> None:
    """Check and apply what :func:`model_run_options` parsed, before anything is loaded."""
    from shoal.cli._options import check_revision, use_hub_token, use_threads

    check_revision(model, revision)
    use_threads(threads)
    use_hub_token(token)
    check_device(device)
    if svd_cache is not None:
        check_output_folder(svd_cache, "--svd-cache")
