"""The `mesh-llm models` and `mesh-llm download` subcommands.

`show_models` prints the catalog (name, size, whether it is on disk, in a table that fits 80
columns; `--long` adds description, repo and draft) and the GGUF files found in `models_dir`;
`download_model` resolves a spec like `--model` would, with a progress bar, and prints the
final path. Both return an exit code and raise `MeshError` subclasses, which the CLI turns
into a message. User output goes to the rich console given.
"""

from __future__ import annotations

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from mesh_llm.config import Config
from mesh_llm.models.catalog import CatalogEntry, load_catalog
from mesh_llm.models.progress import rich_progress
from mesh_llm.models.resolve import list_local_models, resolve_model

EXIT_OK = 0


def show_models(config: Config, console: Console, *, long: bool = False) -> int:
    """Print the catalog and the local models of `config.models_dir`; return 0.

    The table (name, size, on disk) fits 80 columns; `long` prints each model as a block with
    its description, Hugging Face repo and files, and draft, wrapped to the terminal.
    """
    local = list_local_models(config.models_dir)
    local_names = {m.name.lower() for m in local}
    rows = [
        (
            entry,
            _format_size(entry.size_bytes, exact=entry.sha256 is not None),
            "yes" if entry.model_name.lower() in local_names else "no",
        )
        for entry in load_catalog()
    ]
    if long:
        console.print("[bold]Catalog[/]")
        for entry, size, on_disk in rows:
            disk = ", on disk" if on_disk == "yes" else ""
            console.print(f"[bold]{entry.name}[/]  {size}{disk}", highlight=False)
            for line in _details(entry):
                console.print(Padding(Text(line), (0, 0, 0, 4)))
    else:
        catalog = Table(title="Catalog", title_justify="left", box=None)
        catalog.add_column("name", no_wrap=True)
        catalog.add_column("size", justify="right", no_wrap=True)
        catalog.add_column("on disk", no_wrap=True)
        for entry, size, on_disk in rows:
            catalog.add_row(entry.name, size, on_disk)
        console.print(catalog)
        console.print("`mesh-llm models --long` adds descriptions, repos and drafts.")
    if not local:
        console.print(f"No GGUF files in {config.models_dir}.")
        return EXIT_OK
    files = Table(title=f"In {config.models_dir}", title_justify="left", box=None)
    files.add_column("model", no_wrap=True)
    files.add_column("size", justify="right", no_wrap=True)
    files.add_column("file", overflow="fold")
    for model in local:
        files.add_row(model.name, _format_size(model.size_bytes, exact=True), model.path.name)
    console.print(files)
    return EXIT_OK


def _details(entry: CatalogEntry) -> list[str]:
    source = (
        f"PyPI {entry.wheel.requirement} (file from {entry.repo})"
        if entry.wheel is not None
        else f"{entry.repo}: {entry.files[0]}"
        + (f" (+{len(entry.files) - 1} parts)" if len(entry.files) > 1 else "")
    )
    lines = [entry.description, source]
    if entry.draft:
        lines.append(f"draft: {entry.draft}")
    return lines


def download_model(config: Config, name: str, console: Console) -> int:
    """Resolve `name` into `config.models_dir`, downloading it with a progress bar; return 0.

    Raises `ModelNotFound`, `DownloadError` or `ModelError`.
    """
    with rich_progress(name, console=console) as progress:
        model = resolve_model(
            name,
            config.models_dir,
            progress=progress,
            cache_dir=config.cache_dir,
            timeouts=config.backend,
        )
    size = _format_size(model.size_bytes, exact=True)
    console.print(f"{model.name}: {model.path} ({size})", soft_wrap=True)
    return EXIT_OK


def _format_size(size_bytes: int, *, exact: bool) -> str:
    approx = "" if exact else "~"
    if size_bytes >= 1 << 30:
        return f"{approx}{size_bytes / (1 << 30):.1f} GiB"
    return f"{approx}{size_bytes / (1 << 20):.0f} MiB"
