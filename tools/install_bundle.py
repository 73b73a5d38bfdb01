"""Install slipstream's offline bundle on a node without a package index.

    python3 install.py --target /opt/slip-env            # every tier whose parts are here
    python3 install.py --target /opt/slip-env --tiers 1  # the loss kernels and the training step, no DALI
    source /opt/slip-env/env.sh                          # PYTHONPATH and PATH for the installed tiers

Needs only the node's Python 3.12 and pip. Every part's sha256 is checked against
manifest.json before anything is joined; each tier is installed into its own folder with one
`pip install --no-index --no-deps --target` (a second install into one folder would silently
skip what is already there). A `dependency` wheel is installed only when this Python has no
version that satisfies the bundle's packages: a copy on PYTHONPATH would shadow the image's own
for every program. Last, each tier's modules are imported in a fresh process with the new
PYTHONPATH. Stdlib only (plus the node's `packaging`, where there is one).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def fail(message: str) -> None:
    print(f"install: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def join_tier(manifest: dict, tier: str, staging: Path) -> Path:
    """The tier's archive from its parts, every part's sum checked first; the archive's sum after."""
    info = manifest["tiers"][tier]
    parts = [p for p in manifest["parts"] if p["file"] in info["parts"]]
    for part in parts:
        path = HERE / part["file"]
        if not path.is_file():
            fail(f"{path}: missing (tier {tier} needs {', '.join(info['parts'])})")
        if path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
            fail(f"{path}: damaged in transit (size or sha256 differs from manifest.json); copy it again")
    archive = staging / info["archive"]
    with open(archive, "wb") as out:
        for part in parts:
            with open(HERE / part["file"], "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if sha256(archive) != info["sha256"]:
        fail(f"{archive}: the joined parts do not give the tier's archive (sha256 differs)")
    return archive


def unpack(archive: Path, into: Path) -> None:
    into.mkdir(parents=True, exist_ok=True)
    with lzma.open(archive) as xz, tarfile.open(fileobj=xz) as tar:
        for member in tar.getmembers():
            if not member.isfile() or "/" in member.name or member.name.startswith("."):
                fail(f"{archive}: unexpected member {member.name!r}")
            with tar.extractfile(member) as src, open(into / member.name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def _have(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _asks(wheels: list[dict], name: str) -> list[str] | None:
    """What `wheels` ask of `name`: specifier strings ("" for any version); None without `packaging`
    to read them. Markers are evaluated for this Python; extras are pip's business, not this."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:
        return None
    asks = []
    for w in wheels:
        for text in w["requires"]:
            req = Requirement(text)
            if canonicalize_name(req.name) == canonicalize_name(name) and (req.marker is None or req.marker.evaluate({"extra": ""})):
                asks.append(str(req.specifier))
    return asks


def _needed(name: str, asks: list[str] | None) -> bool:
    """Whether a dependency must come from the bundle: asked for, and the image has no version that does."""
    have = _have(name)
    if asks is None:  # no `packaging` here: versions cannot be compared, presence can
        return have is None
    if not asks:
        return False
    if have is None:
        return True
    from packaging.specifiers import SpecifierSet

    return not all(have in SpecifierSet(s, prereleases=True) for s in asks)


def plan(wheels: list[dict]) -> tuple[set[str], list[str]]:
    """The files to install: every core wheel, and each dependency that what is installed asks for
    and the image cannot give, until nothing changes (a kept package's own pins ask for nothing).
    Also a line per dependency the image's own version serves."""
    install = {w["file"] for w in wheels if w["role"] == "core"}
    changed = True
    while changed:
        changed = False
        for w in wheels:
            if w["file"] not in install and _needed(w["name"], _asks([x for x in wheels if x["file"] in install], w["name"])):
                install.add(w["file"])
                changed = True
    kept = [f"{w['name']} {_have(w['name'])} (already importable here)" for w in wheels if w["file"] not in install and _have(w["name"])]
    return install, kept


def check_imports(manifest: dict, target: Path, tiers: list[str]) -> None:
    """Each installed tier's modules (manifest["imports"]) import in a fresh process on the new PYTHONPATH."""
    env_path = ":".join(str(target / f"tier-{t}") for t in sorted(tiers, reverse=True))
    modules = [m for t in tiers for m in manifest["imports"][t]]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n    print('  import', m, 'ok')"
    # DeepSpeed picks its accelerator at import; "cpu" keeps this check from touching a GPU.
    env = {**os.environ, "PYTHONPATH": env_path, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    proc = subprocess.run([sys.executable, "-c", code, *modules], env=env, capture_output=True, text=True)
    print(proc.stdout, end="")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        fail(f"installed, but an import fails: {lines[-1] if lines else proc.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Install slipstream's offline bundle (see the top of this file).")
    parser.add_argument("--target", required=True, help="folder to install into (tier-1/, tier-2/, env.sh)")
    parser.add_argument("--tiers", help="comma-separated tiers (default: every tier whose parts are here)")
    args = parser.parse_args()
    manifest = json.loads((HERE / "manifest.json").read_text())
    if not sys.version.startswith(f"{manifest['python']}."):
        fail(f"this bundle is for Python {manifest['python']}, this is {sys.version.split()[0]}")
    present = [t for t, info in manifest["tiers"].items() if all((HERE / p).is_file() for p in info["parts"])]
    tiers = args.tiers.split(",") if args.tiers else present
    if not tiers:
        fail(f"no tier has all its parts in {HERE}")
    if "2" in tiers and "1" not in tiers and not (Path(args.target) / "tier-1").is_dir():
        fail("tier 2 (DALI) goes on top of tier 1: install tier 1 first, or both")
    target = Path(args.target).resolve()
    staging = target / ".staging"
    unknown = [t for t in tiers if t not in manifest["tiers"]]
    if unknown:
        fail(f"no tier {unknown[0]} in this bundle (tiers: {', '.join(manifest['tiers'])})")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        install_tiers(manifest, tiers, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    installed = sorted(p.name.split("-")[1] for p in target.glob("tier-*"))
    env_sh = target / "env.sh"
    paths = ":".join(str(target / f"tier-{t}") for t in sorted(installed, reverse=True))
    env_sh.write_text(f'export PYTHONPATH="{paths}${{PYTHONPATH:+:$PYTHONPATH}}"\nexport PATH="{target / "tier-1" / "bin"}:$PATH"\n')
    check_imports(manifest, target, installed)
    print(f"done: source {env_sh}")
    return 0


def install_tiers(manifest: dict, tiers: list[str], target: Path, staging: Path) -> None:
    archives = {tier: join_tier(manifest, tier, staging) for tier in tiers}  # every part checked before anything is installed
    install, kept = plan(manifest["wheels"])
    for line in kept:
        print(f"keeping {line}")
    for tier in tiers:
        wheels_dir = staging / f"wheels-{tier}"
        unpack(archives[tier], wheels_dir)
        chosen = [w for w in manifest["wheels"] if str(w["tier"]) == tier and w["file"] in install]
        folder = target / f"tier-{tier}"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(folder),
               *(str(wheels_dir / w["file"]) for w in chosen)]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)  # no half-installed tier that env.sh would name
            fail(f"pip could not install tier {tier} into {folder}")
        print(f"tier {tier}: installed {', '.join(w['name'] + ' ' + w['version'] for w in chosen)}")


if __name__ == "__main__":
    sys.exit(main())
