"""The offline bundle's two halves on small wheels made here: `tools/bundle.py` writes the parts
and manifest, the shipped install script checks, joins and installs them with --no-index."""
from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[3] / "tools"
sys.path.insert(0, str(TOOLS))
import bundle  # noqa: E402


def _wheel(into: Path, name: str, version: str, code: str, requires: tuple[str, ...] = ()) -> Path:
    """A minimal pure-Python wheel: one module, its METADATA, WHEEL and RECORD."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": code,
        f"{dist}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = into / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:  # as real wheels are: tier 2 stores them uncompressed
        for p, text in files.items():
            z.writestr(p, text)
    return path


@pytest.fixture()
def made(tmp_path: Path) -> Path:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    specs = [  # (name, tier, role, requires, code)
        ("slipfake_core", 1, "core", ("slipfake_dep>=1", "PyYAML>=5"), "import slipfake_dep\nVALUE = slipfake_dep.VALUE + 1\n"),
        ("slipfake_dep", 1, "dependency", (), "VALUE = 41\n" + "# padding\n" * 200),
        # The image's own serves here, so it is not installed, and neither is what only it asks for.
        ("PyYAML", 1, "dependency", ("slipfake_pin==9",), "raise ImportError('the image has its own')\n"),
        ("slipfake_pin", 1, "dependency", (), "raise ImportError('asked for by nothing installed')\n"),
        ("slipfake_two", 2, "core", ("slipfake_core",), "import slipfake_core\n"),
    ]
    entries = []
    for name, tier, role, requires, code in specs:
        w = _wheel(wheels, name, "1.0", code, requires)
        entries.append({"file": w.name, "name": name, "version": "1.0", "tier": tier, "role": role, "requires": list(requires), "sha256": ""})
    out = tmp_path / "bundle"
    python = ".".join(map(str, sys.version_info[:2]))
    bundle.assemble(entries, wheels, tmp_path / "work", out, python=python, imports={1: ("slipfake_core",), 2: ("slipfake_two",)}, part_bytes=400)
    return out


def _install(out: Path, target: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(out / "install.py"), "--target", str(target), *extra], capture_output=True, text=True, timeout=300)


def test_the_parts_install_each_tier_and_keep_what_the_image_has(made: Path, tmp_path: Path) -> None:
    manifest = json.loads((made / "manifest.json").read_text())
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 400 for p in manifest["parts"])  # several parts per tier
    assert {p["tier"] for p in manifest["parts"]} == {1, 2}
    target = tmp_path / "site"
    proc = _install(made, target)
    assert proc.returncode == 0, proc.stderr
    assert (target / "tier-1" / "slipfake_core.py").is_file() and (target / "tier-1" / "slipfake_dep.py").is_file()
    assert not (target / "tier-1" / "PyYAML.py").exists() and "keeping PyYAML" in proc.stdout
    assert not (target / "tier-1" / "slipfake_pin.py").exists()
    assert (target / "tier-2" / "slipfake_two.py").is_file()
    assert "import slipfake_two ok" in proc.stdout
    env_sh = (target / "env.sh").read_text()
    assert f"{target / 'tier-2'}:{target / 'tier-1'}" in env_sh
    check = subprocess.run(["bash", "-c", f"source {target / 'env.sh'} && python -c 'import slipfake_core; print(slipfake_core.VALUE)'"],
                           capture_output=True, text=True)  # fmt: skip
    assert check.stdout.strip() == "42", check.stderr


def test_a_damaged_or_missing_part_is_one_line_and_installs_nothing(made: Path, tmp_path: Path) -> None:
    part = made / json.loads((made / "manifest.json").read_text())["parts"][1]["file"]
    data = bytearray(part.read_bytes())
    data[0] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = _install(made, tmp_path / "site", "--tiers", "1")
    assert proc.returncode == 2 and not (tmp_path / "site" / "tier-1").exists()
    assert proc.stderr.strip().count("\n") == 0 and f"{part}: damaged in transit" in proc.stderr
    part.unlink()
    proc = _install(made, tmp_path / "site", "--tiers", "1")
    assert proc.returncode == 2 and f"{part}: missing" in proc.stderr


def test_tier_two_alone_needs_tier_one_first(made: Path, tmp_path: Path) -> None:
    proc = _install(made, tmp_path / "site", "--tiers", "2")
    assert proc.returncode == 2 and "install tier 1 first" in proc.stderr
