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


def _satisfied(name: str, specifiers: list[str]) -> bool | None:
    """Whether this Python's own `name` satisfies every specifier; None when it has none."""
    try:
        have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return True  # no way to compare versions: trust the image's own
    return all(have in SpecifierSet(s, prereleases=True) for s in specifiers if s)


def _asks(wheels: list[dict], name: str) -> list[str]:
    """What the bundle's packages ask of `name` (specifiers only; markers and extras are read by pip, not here)."""
    try:
        from packaging.requirements import Requirement
        from packaging.utils import canonicalize_name
    except ImportError:
        return []
    asks = []
    for w in wheels:
        for text in w["requires"]:
            req = Requirement(text)
            if canonicalize_name(req.name) == canonicalize_name(name) and (req.marker is None or req.marker.evaluate({"extra": ""})):
                asks.append(str(req.specifier))
    return asks


def choose(wheels: list[dict], tier: str) -> tuple[list[dict], list[str]]:
    """The tier's wheels to install, and a line per dependency the image already satisfies."""
    chosen, kept = [], []
    for w in (w for w in wheels if str(w["tier"]) == tier):
        if w["role"] == "dependency":
            ok = _satisfied(w["name"], _asks(wheels, w["name"]))
            if ok:
                kept.append(f"{w['name']} {importlib.metadata.version(w['name'])} (the image's)")
                continue
        chosen.append(w)
    return chosen, kept


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
    for tier in tiers:
        if tier not in manifest["tiers"]:
            fail(f"no tier {tier} in this bundle (tiers: {', '.join(manifest['tiers'])})")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        wheels_dir = staging / "wheels"
        unpack(join_tier(manifest, tier, staging), wheels_dir)
        chosen, kept = choose(manifest["wheels"], tier)
        for line in kept:
            print(f"tier {tier}: keeping {line}")
        folder = target / f"tier-{tier}"
        shutil.rmtree(folder, ignore_errors=True)
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(folder),
               *(str(wheels_dir / w["file"]) for w in chosen)]  # fmt: skip
        if subprocess.run(cmd).returncode != 0:
            fail(f"pip could not install tier {tier} into {folder}")
        print(f"tier {tier}: installed {', '.join(w['name'] + ' ' + w['version'] for w in chosen)}")
    shutil.rmtree(staging, ignore_errors=True)
    installed = sorted(p.name.split("-")[1] for p in target.glob("tier-*"))
    env_sh = target / "env.sh"
    paths = ":".join(str(target / f"tier-{t}") for t in sorted(installed, reverse=True))
    env_sh.write_text(f'export PYTHONPATH="{paths}${{PYTHONPATH:+:$PYTHONPATH}}"\nexport PATH="{target / "tier-1" / "bin"}:$PATH"\n')
    check_imports(manifest, target, installed)
    print(f"done: source {env_sh}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
