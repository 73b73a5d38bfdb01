"""The GPU half of slipstream, checked and measured in one run (`make gpu-check OUT=DIR`, or on a
node without make: `python3 tools/gpu_check.py --out DIR` from the repository's root, after
`source <bundle target>/env.sh`).

Steps, in order, each in its own process under its own time budget, each writing its JSON to
OUT as soon as it ends, so a run cut short still returns what it measured:

    1-env       the GPU, driver and package versions
    2-tests     pytest tests/gpu and the unit tests that need CUDA (junit XML beside)
    3-loss      slip profile loss at B=32768, d=512, bf16: reference, chunked, triton; the largest
                B the triton backend fits in 8 GiB
    4-step      slip profile step for SLIP ViT-B/16, bf16, ZeRO-1, at the largest per-GPU batch
                that fits: synthetic and DALI loaders, triton and reference losses, and plain
                torch with the reference loss as the baseline; MFU
    5-pipeline  slip profile pipeline --device gpu on generated photos against PIL + torchvision

Without CUDA a step that needs it says `"skipped": "no CUDA"` and runs what it can on the CPU,
briefly; without DALI (the bundle's first tier only) the DALI parts say `"skipped": "no DALI"`.
The budgets add up to under 9 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGETS = {"env": 20, "tests": 100, "loss": 100, "step": 240, "pipeline": 90}  # seconds; 550 in all
PHOTOS = 1024  # generated for the DALI parts of steps 4 and 5


def sh(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; on timeout the whole group goes (DALI and spawn children too)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, (err or "") + f"\ntimed out after {timeout:.0f} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def slip_json(args: list[str], timeout: float) -> dict:
    """A `slip ... --json` command's report, or what went wrong, in one dict."""
    started = time.monotonic()
    proc = sh([sys.executable, "-m", "slip", *args, "--json"], timeout)
    result: dict = {"command": "slip " + " ".join(args), "seconds": round(time.monotonic() - started, 1), "returncode": proc.returncode}
    try:
        result["report"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        result["stderr_tail"] = proc.stderr[-3000:]
    return result


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def step_env(out: Path, deadline: float) -> dict:
    import importlib.metadata as md

    import torch

    info: dict = {"python": sys.version.split()[0], "cpu_cores": os.cpu_count(), "cuda": cuda(), "dali": dali()}
    versions = {}
    for name in ("torch", "triton", "timm", "numba", "deepspeed", "ffcv", "open_clip_torch", "nvidia-dali-cuda120", "slipstream"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    info["packages"] = versions
    rev = sh(["git", "rev-parse", "HEAD"], 10)
    info["git_revision"] = rev.stdout.strip() or None
    if info["cuda"]:
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                       "multiprocessors": p.multi_processor_count, "torch_cuda": torch.version.cuda}  # fmt: skip
        smi = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], 20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    return info


def step_tests(out: Path, deadline: float) -> dict:
    targets = ["tests/gpu"]
    if cuda():  # the unit tests that skip without CUDA, run where they can
        targets += ["tests/unit/kernels", "tests/unit/trainer/test_lamb.py", "tests/unit/profiling/test_flops.py"]
    ignore = [] if dali() else ["--ignore", "tests/gpu/test_dali_gpu.py"]
    xml = out / "2-tests.xml"
    proc = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ignore, *targets], deadline - time.monotonic())
    result: dict = {"targets": targets, "returncode": proc.returncode, "tail": proc.stdout[-2000:]}
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        result["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None]
    if not cuda():
        result["skipped"] = "no CUDA"
    if not dali():
        result["dali_tests"] = "skipped: no DALI"
    return result


def step_loss(out: Path, deadline: float) -> dict:
    if not cuda():  # the CPU path, briefly: the same command on a small batch
        cpu = slip_json(["profile", "loss", "--batch", "1024", "--dim", "512", "--backend", "reference,chunked"], deadline - time.monotonic())
        return {"skipped": "no CUDA", "cpu": cpu}
    result = {"profile": slip_json(["profile", "loss", "--batch", "32768", "--dim", "512", "--backend", "reference,chunked,triton",
                                    "--device", "cuda", "--dtype", "bfloat16", "--repeats", "3"], (deadline - time.monotonic()) * 0.6)}  # fmt: skip
    result["fit_8gib"] = slip_json(["profile", "loss", "--batch", "32768", "--dim", "512", "--backend", "triton", "--device", "cuda",
                                    "--dtype", "bfloat16", "--fit", "8"], deadline - time.monotonic())  # fmt: skip
    return result


def photos(work: Path, n: int, timeout: float) -> Path | None:
    """A converted dataset of `n` generated photo-like JPEGs (400-640 px, stored at 384), made once."""
    beton = work / f"photos-{n}"
    if (beton / "manifest.json").is_file():
        return beton
    gen = sh([sys.executable, "-c", "import os, sys; from pathlib import Path; from profiling.convert_bench import synthetic_images; "
              "synthetic_images(Path(sys.argv[1]), int(sys.argv[2]), workers=os.cpu_count())", str(work / "raw"), str(n)], timeout / 2)  # fmt: skip
    conv = sh([sys.executable, "-m", "slip", "convert", "folder", "--images", str(work / "raw"), "--out", str(beton), "--max-side", "384",
               "--captions-per-image", "1"], timeout / 2)  # fmt: skip
    return beton if gen.returncode == 0 and conv.returncode == 0 else None


def step_step(out: Path, deadline: float, work: Path) -> dict:
    common = ["--warmup", "2", "--steps", "5"]
    if not cuda():  # the CPU path, briefly: the tiny recipe on the synthetic loader, with the plain baseline
        cpu = slip_json(["profile", "step", "--config", "tiny_cpu", "data.loader=synthetic", "data.batch_size=32", "--warmup", "1", "--steps", "2",
                         "--compare", "", "loss.backend=reference", "--plain-baseline"], deadline - time.monotonic())  # fmt: skip
        return {"skipped": "no CUDA", "cpu": cpu}
    import torch

    result: dict = {"attempts": []}
    # Per-GPU batches tried, largest first: SLIP ViT-B/16 in bf16 holds about 0.2 GB per sample.
    batches = (384, 256, 128) if torch.cuda.get_device_properties(0).total_memory > 100 * 2**30 else (256, 128)
    data = photos(work, PHOTOS, 30) if dali() else None
    variants = ["loss.backend=triton", "loss.backend=reference"]  # on the synthetic loader, as the plain baseline
    if data is not None:
        variants += [f"data.loader=dali data.train={data} loss.backend=triton"]
    else:
        result["dali"] = "skipped: no DALI" if not dali() else "skipped: photos could not be made"
    for batch in batches:
        report = slip_json(["profile", "step", "--config", "slip_vitb16", "engine.precision=bf16", "engine.zero_stage=1", "data.loader=synthetic",
                            f"data.batch_size={batch}", *common, "--compare", *variants, "--plain-baseline"], deadline - time.monotonic())  # fmt: skip
        result["attempts"].append(report)
        first = (report.get("report") or {}).get("configs", [{}])[0]
        if "error" not in first or "out of memory" not in first["error"].lower() or time.monotonic() > deadline:
            result["batch_per_gpu"] = batch
            break
    return result


def step_pipeline(out: Path, deadline: float, work: Path) -> dict:
    if not dali():
        return {"skipped": "no DALI"}
    n, args = (PHOTOS, ["--device", "gpu", "--batch-size", "256", "--workers", "16", "--steps", "10"]) if cuda() else \
        (64, ["--device", "cpu", "--batch-size", "16", "--workers", "2", "--steps", "2"])  # fmt: skip
    data = photos(work, n, (deadline - time.monotonic()) / 2)
    if data is None:
        return {"error": "the photos could not be generated and converted"}
    result = {"profile": slip_json(["profile", "pipeline", "--data", str(data), *args], deadline - time.monotonic())}
    if not cuda():
        result["skipped"] = "no CUDA (the CPU graph ran instead, briefly)"
    return result


STEPS = {"env": step_env, "tests": step_tests, "loss": step_loss, "step": step_step, "pipeline": step_pipeline}


def run_one(name: str, out: Path, work: Path) -> None:
    """The child: one step, its JSON written when it ends."""
    index = list(STEPS).index(name) + 1
    started = time.monotonic()
    deadline = started + BUDGETS[name] - 5  # a margin to write the JSON
    fn = STEPS[name]
    result = fn(out, deadline, work) if name in ("step", "pipeline") else fn(out, deadline)
    result = {"step": name, "seconds": round(time.monotonic() - started, 1), **result}
    (out / f"{index}-{name}.json").write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON reports")
    parser.add_argument("--work", default="/tmp/slip-gpu-check", help="scratch folder for generated data")
    parser.add_argument("--only", help="comma-separated steps (default: all, in order)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process of one step
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if args.step:
        run_one(args.step, out, work)
        return 0
    names = args.only.split(",") if args.only else list(STEPS)
    summary = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CI": "true"}
    for name in names:
        started = time.monotonic()
        proc = sh([sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out), "--work", str(work)], BUDGETS[name], env=env)
        index = list(STEPS).index(name) + 1
        report = out / f"{index}-{name}.json"
        if not report.is_file():  # killed at its budget, or crashed: say so in its place
            report.write_text(json.dumps({"step": name, "timed_out": proc.returncode == -9, "returncode": proc.returncode,
                                          "stderr_tail": proc.stderr[-3000:]}, indent=2) + "\n")  # fmt: skip
        summary[name] = {"seconds": round(time.monotonic() - started, 1), "returncode": proc.returncode}
        print(f"gpu-check: {name}: {summary[name]['seconds']} s -> {report}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
