"""The `mesh-llm models` and `mesh-llm download` subcommands.

`show_models` prints the catalog (size, draft, whether it is on disk) and the GGUF files found
in `models_dir`; `download_model` resolves a spec like `--model` would, with a progress bar, and
prints the final path. Both return an exit code and raise `MeshError` subclasses, which the CLI
turns into a message. User output goes to the rich console given.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mesh_llm.config import Config
from mesh_llm.models.catalog import load_catalog
from mesh_llm.models.progress import rich_progress
from mesh_llm.models.resolve import list_local_models, resolve_model

EXIT_OK = 0


def show_models(config: Config, console: Console) -> int:
    """Print the catalog and the local models of `config.models_dir`; return 0."""
    local = list_local_models(config.models_dir)
    local_names = {m.name.lower() for m in local}
    catalog = Table(title="Catalog", title_justify="left")
    for column in ("name", "size", "draft", "on disk", "description"):
        catalog.add_column(column, justify="right" if column == "size" else "left")
    for entry in load_catalog():
        on_disk = entry.model_name.lower() in local_names
        catalog.add_row(
            entry.name,
            _format_size(entry.size_bytes, exact=entry.sha256 is not None),
            entry.draft or "",
            "yes" if on_disk else "no",
            entry.description,
        )
    console.print(catalog)
    if not local:
        console.print(f"No GGUF files in {config.models_dir}.")
        return EXIT_OK
    files = Table(title=f"In {config.models_dir}", title_justify="left")
    files.add_column("model")
    files.add_column("size", justify="right")
    files.add_column("file")
    for model in local:
        files.add_row(model.name, _format_size(model.size_bytes, exact=True), model.path.name)
    console.print(files)
    return EXIT_OK


def download_model(config: Config, name: str, console: Console) -> int:
    """Resolve `name` into `config.models_dir`, downloading it with a progress bar; return 0.

    Raises `ModelNotFound`, `DownloadError` or `ModelError`.
    """
    with rich_progress(name, console=console) as progress:
        model = resolve_model(
            name, config.models_dir, progress=progress, cache_dir=config.cache_dir
        )
    console.print(f"{model.name}: {model.path} ({_format_size(model.size_bytes, exact=True)})")
    return EXIT_OK


def _format_size(size_bytes: int, *, exact: bool) -> str:
    approx = "" if exact else "~"
    if size_bytes >= 1 << 30:
        return f"{approx}{size_bytes / (1 << 30):.1f} GiB"
    return f"{approx}{size_bytes / (1 << 20):.0f} MiB"
