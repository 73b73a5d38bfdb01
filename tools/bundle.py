"""`make bundle`: the offline bundle for a bare CUDA node, built here into build/bundle/.

    build/bundle/part-000 ...   pieces of at most 55 MiB (tools/bundle_spec.py: PART_BYTES)
    build/bundle/manifest.json  every part's sha256 and tier, every wheel's name, version, tier and role
    build/bundle/install.py     checks the sums, joins the parts, installs each tier with one
                                `pip install --no-index --no-deps --target` (python3 install.py --help)

Each tier is a tar of wheels, compressed with xz. Tier 2's wheels are stored uncompressed
inside the tar first: DALI's shared libraries then compress across files, about 30% smaller
than the wheels' own deflate. Downloads and builds are kept in build/bundle-work/.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bundle_spec import IMPORTS, PACKAGES, PART_BYTES, PLATFORMS, PYTHON, Package  # noqa: E402
from ffcv_wheel import ffcv_wheel, run, sha256_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FORMAT = "slipstream-bundle-v1"


def find_python312() -> str:
    """An interpreter of the node's Python, to build FFCV's extension and the rehearsal with."""
    candidates = [os.environ.get("PYTHON312", ""), shutil.which(f"python{PYTHON}") or ""]
    pyenv = Path.home() / ".pyenv" / "versions"
    candidates += sorted(str(p / "bin" / "python3") for p in pyenv.glob(f"{PYTHON}.*"))
    for c in candidates:
        if c and subprocess.run([c, "-c", f"import sys; assert sys.version.startswith('{PYTHON}.')"], capture_output=True).returncode == 0:
            return c
    raise SystemExit(f"bundle: no Python {PYTHON} found (set PYTHON312=/path/to/python{PYTHON}; pyenv install {PYTHON} gives one)")


def version_of(package: Package) -> str:
    """The version this project's environment runs (and CI tests)."""
    name = "slipstream" if package.build == "local" else package.name
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"bundle: {name} is not installed here; run `make setup` first") from None


def fetch_wheel(package: Package, version: str, into: Path) -> Path:
    found = _built(into, package.name, version)
    if found is None:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", PYTHON,
             "--implementation", "cp", *platforms, "-d", str(into), f"{package.name}=={version}"])  # fmt: skip
        found = _built(into, package.name, version)
    if found is None:
        raise SystemExit(f"bundle: pip saved no wheel of {package.name}=={version}")
    return found


def build_pure(package: Package, version: str, into: Path) -> Path:
    """A pure-Python package that PyPI ships as an sdist only (DeepSpeed), as a py3-none-any wheel."""
    found = _built(into, package.name, version)
    if found is None:
        env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed: no ops built here; they JIT-build on the node
        run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(into), f"{package.name}=={version}"], env=env)
        found = _built(into, package.name, version)
    if found is None or not found.name.endswith("-py3-none-any.whl"):
        raise SystemExit(f"bundle: {package.name}=={version} did not build as a pure-Python wheel: {found}")
    return found


def build_local(into: Path) -> Path:
    for old in into.glob("slipstream-*.whl"):
        old.unlink()  # always rebuilt: it is this checkout
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(into), str(REPO)])
    return next(into.glob("slipstream-*.whl"))


def _built(into: Path, name: str, version: str) -> Path | None:
    stem = name.replace("-", "_").lower()
    found = [p for p in into.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
    return found[0] if found else None


def requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8")
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def stored(wheel: Path) -> bytes:
    """The wheel rewritten without compression (same files, same RECORD): xz then sees the bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            copy.external_attr, copy.compress_type = info.external_attr, zipfile.ZIP_STORED
            dst.writestr(copy, src.read(info))
    return out.getvalue()


def tier_archive(tier: int, wheels: list[Path], path: Path) -> None:
    """The tier's wheels in one tar (tier 2's stored uncompressed), then xz: the xz command on
    every core where there is one, else Python's lzma."""
    tar_path = path.with_suffix("")
    with tarfile.open(tar_path, "w") as tar:
        for wheel in wheels:
            data = stored(wheel) if tier == 2 else wheel.read_bytes()
            info = tarfile.TarInfo(wheel.name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    if shutil.which("xz"):
        with open(path, "wb") as f:
            subprocess.run(["xz", "-6", "-T0", "-c", str(tar_path)], stdout=f, check=True)
    else:
        with open(tar_path, "rb") as src, lzma.open(path, "wb", preset=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    tar_path.unlink()


def split(archive: Path, out: Path, first_index: int, part_bytes: int = PART_BYTES) -> list[dict]:
    parts = []
    with open(archive, "rb") as f:
        for index in range(first_index, first_index + 10_000):
            block = f.read(part_bytes)
            if not block:
                break
            name = f"part-{index:03d}"
            (out / name).write_bytes(block)
            parts.append({"file": name, "bytes": len(block), "sha256": hashlib.sha256(block).hexdigest()})
    return parts


def assemble(
    entries: list[dict], wheels_dir: Path, work: Path, out: Path, *, python: str = PYTHON, imports: dict = IMPORTS, part_bytes: int = PART_BYTES
) -> dict:
    """`out` made anew: each tier's wheels (`entries`, from `wheels_dir`) as parts, manifest.json and install.py."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    work.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"format": FORMAT, "python": python, "platform": "manylinux x86_64", "part_bytes": part_bytes,
                      "imports": {str(t): list(m) for t, m in imports.items()}, "tiers": {}, "parts": [], "wheels": entries}  # fmt: skip
    for tier in sorted({e["tier"] for e in entries}):
        archive = work / f"tier-{tier}.tar.xz"
        tier_archive(tier, [wheels_dir / e["file"] for e in entries if e["tier"] == tier], archive)
        parts = split(archive, out, len(manifest["parts"]), part_bytes)
        manifest["parts"] += [{**p, "tier": tier} for p in parts]
        manifest["tiers"][str(tier)] = {"archive": archive.name, "bytes": archive.stat().st_size, "sha256": sha256_file(archive),
                                        "parts": [p["file"] for p in parts]}  # fmt: skip
        print(f"tier {tier}: {archive.stat().st_size / 2**20:.1f} MiB in {len(parts)} part(s)")
    shutil.copy(Path(__file__).resolve().parent / "install_bundle.py", out / "install.py")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "build" / "bundle"))
    parser.add_argument("--work", default=str(REPO / "build" / "bundle-work"))
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    wheels_dir = work / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    python312 = find_python312()
    entries: list[dict] = []
    for package in PACKAGES:
        if package.build == "local":
            wheel, version = build_local(wheels_dir), version_of(package)
        else:
            version = version_of(package)
            builder = {"wheel": fetch_wheel, "pure": build_pure}.get(package.build)
            wheel = builder(package, version, wheels_dir) if builder else ffcv_wheel(work, python312, wheels_dir)
        entries.append({"file": wheel.name, "name": package.name, "version": version, "tier": package.tier,
                        "role": package.role, "requires": requirements(wheel), "sha256": sha256_file(wheel)})  # fmt: skip
    manifest = assemble(entries, wheels_dir, work, out)
    print(f"bundle: {out} ({len(manifest['parts'])} parts; install on the node with `python3 install.py --target DIR`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
