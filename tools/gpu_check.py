"""The GPU half of slipstream, checked and measured in one run (`make gpu-check OUT=DIR`, or on a
node without make: `python3 tools/gpu_check.py --out DIR` from the repository's root, after
`source <bundle target>/env.sh`).

Steps, in order, each in its own process under its own time budget, each rewriting its JSON in
OUT as each of its parts ends, so a run cut short still returns what it measured:

    1-env       the GPU, driver and package versions
    2-tests     pytest tests/gpu and the unit tests that need CUDA (junit XML beside)
    3-loss      slip profile loss at B=32768, d=512, bf16: reference, chunked, triton; the largest
                B the triton backend fits in 8 GiB
    4-step      slip profile step for SLIP ViT-B/16, bf16, ZeRO-1, at the largest per-GPU batch
                that fits: triton and reference losses on the synthetic loader, triton on DALI
                (the stall), and plain torch with the reference loss as the baseline; MFU
    5-pipeline  slip profile pipeline --device gpu on generated photos against PIL + torchvision

Without CUDA a step that needs it says `"skipped": "no CUDA"` and runs what it can on the CPU,
briefly; without DALI (the bundle's first tier only) the DALI parts say `"skipped": "no DALI"`.
The budgets add up to 9 minutes (`--budget-scale` stretches them on a slower node).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUDGETS = {"env": 20, "tests": 100, "loss": 120, "step": 220, "pipeline": 80}  # seconds; 540 in all
PHOTOS = 1024  # generated for the DALI parts of steps 4 and 5
_GROUPS: set[int] = set()  # process groups this process started and has not reaped


def _kill(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def sh(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run `cmd` in a process group of its own. At `timeout` the group gets SIGTERM, and SIGKILL
    5 s later: a step passes the SIGTERM on to the groups it started (`_on_term`)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)
    _GROUPS.add(proc.pid)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        _kill(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            _kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return subprocess.CompletedProcess(cmd, -9, out, (err or "") + f"\ntimed out after {timeout:.0f} s")
    finally:
        _GROUPS.discard(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _on_term(signum: int, frame: object) -> None:
    for pgid in list(_GROUPS):
        _kill(pgid, signal.SIGKILL)
    os._exit(128 + signum)


def left(deadline: float) -> float:
    return max(1.0, deadline - time.monotonic())


def slip_json(args: list[str], timeout: float, env: dict | None = None) -> dict:
    """A `slip ... --json` command's report, or what went wrong, in one dict."""
    started = time.monotonic()
    proc = sh([sys.executable, "-m", "slip", *args, "--json"], timeout, env=env)
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
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


class Report(dict):
    """A step's JSON, rewritten on disk at each `save`: what a killed step measured survives it."""

    def __init__(self, path: Path, name: str) -> None:
        super().__init__(step=name)
        self.path, self.started = path, time.monotonic()

    def save(self, **parts) -> None:
        self.update(parts, seconds=round(time.monotonic() - self.started, 1))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=2) + "\n")
        tmp.replace(self.path)


def step_env(report: Report, deadline: float, work: Path) -> None:
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "triton", "timm", "numba", "deepspeed", "ffcv", "open_clip_torch", "nvidia-dali-cuda120", "slipstream"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    report.save(python=sys.version.split()[0], cpu_cores=os.cpu_count(), cuda=cuda(), dali=dali(), packages=versions)
    if cuda():
        p = torch.cuda.get_device_properties(0)
        report.save(gpu={"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
                         "multiprocessors": p.multi_processor_count, "torch_cuda": torch.version.cuda})  # fmt: skip
        smi = sh(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"], min(8.0, left(deadline)))
        report.save(nvidia_smi=smi.stdout.strip() or smi.stderr.strip())
    report.save(git_revision=sh(["git", "rev-parse", "HEAD"], min(4.0, left(deadline))).stdout.strip() or None)


def step_tests(report: Report, deadline: float, work: Path) -> None:
    if importlib.util.find_spec("pytest") is None:
        report.save(skipped="no pytest on this node")
        return
    targets = ["tests/gpu"]
    env = dict(os.environ)
    if cuda():  # the unit tests that skip without CUDA, run where they can, on DeepSpeed's CUDA accelerator
        targets += ["tests/unit/kernels", "tests/unit/trainer/test_lamb.py", "tests/unit/profiling/test_flops.py"]
        env["DS_ACCELERATOR"] = "cuda"
    ignore = [] if dali() else ["--ignore", "tests/gpu/test_dali_gpu.py", "--ignore", "tests/gpu/test_step_profile_gpu.py"]
    xml = report.path.with_suffix(".xml")
    proc = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *ignore, *targets], left(deadline), env=env)
    report.save(targets=targets, returncode=proc.returncode, tail=proc.stdout[-2000:])
    if xml.is_file():
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        report.save(counts={k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")},
                    failed=[f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase") if c.find("failure") is not None or c.find("error") is not None])  # fmt: skip
    if not cuda():
        report.save(skipped="no CUDA")
    if not dali():
        report.save(dali_tests="skipped: no DALI")


def step_loss(report: Report, deadline: float, work: Path) -> None:
    if not cuda():  # the CPU path, briefly: the same command on a small batch
        report.save(skipped="no CUDA", cpu=slip_json(["profile", "loss", "--batch", "1024", "--dim", "512", "--backend", "reference,chunked"], left(deadline)))
        return
    common = ["--batch", "32768", "--dim", "512", "--device", "cuda", "--dtype", "bfloat16"]
    report.save(profile=slip_json(["profile", "loss", *common, "--backend", "reference,chunked,triton", "--repeats", "3"], left(deadline) * 0.6))
    report.save(fit_8gib=slip_json(["profile", "loss", *common, "--backend", "triton", "--fit", "8"], left(deadline)))


def photos(work: Path, n: int, timeout: float) -> Path | None:
    """A converted dataset of `n` generated photo-like JPEGs (400-640 px, stored at 384), made once."""
    import shutil

    beton, deadline = work / f"photos-{n}", time.monotonic() + timeout
    manifest = beton / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return beton
    shutil.rmtree(beton, ignore_errors=True)  # a conversion cut short earlier
    gen = sh([sys.executable, "-c", "import os, sys; from pathlib import Path; from profiling.convert_bench import synthetic_images; "
              "synthetic_images(Path(sys.argv[1]), int(sys.argv[2]), workers=os.cpu_count())", str(work / f"raw-{n}"), str(n)], timeout / 2)  # fmt: skip
    conv = sh([sys.executable, "-m", "slip", "convert", "folder", "--images", str(work / f"raw-{n}"), "--out", str(beton), "--max-side", "384",
               "--captions-per-image", "1"], left(deadline))  # fmt: skip
    return beton if gen.returncode == 0 and conv.returncode == 0 else None


def step_step(report: Report, deadline: float, work: Path) -> None:
    if not cuda():  # the CPU path, briefly: the tiny recipe on the synthetic loader, with the plain baseline
        report.save(skipped="no CUDA", cpu=slip_json(["profile", "step", "--config", "tiny_cpu", "data.loader=synthetic", "data.batch_size=32",
                                                      "--warmup", "1", "--steps", "2", "--compare", "", "loss.backend=reference", "--plain-baseline"],
                                                     left(deadline)))  # fmt: skip
        return
    import torch

    base = ["profile", "step", "--config", "slip_vitb16", "engine.precision=bf16", "engine.zero_stage=1", "data.loader=synthetic",
            "--warmup", "2", "--steps", "5"]  # fmt: skip
    # Per-GPU batches tried, largest first: SLIP ViT-B/16 in bf16 holds about 0.2 GB per sample.
    batches = (384, 256, 128) if torch.cuda.get_device_properties(0).total_memory > 100 * 2**30 else (256, 128)
    configs: dict = {}
    for batch in batches:  # one configuration per command: each result is saved as soon as it exists
        r = slip_json([*base, f"data.batch_size={batch}", "--compare", "loss.backend=triton"], left(deadline))
        configs[f"triton, synthetic, batch {batch}"] = r
        report.save(configs=configs)
        error = ((r.get("report") or {}).get("configs") or [{}])[0].get("error", "")
        if "report" in r and "out of memory" not in error.lower():
            break
    if "report" not in r or error:
        report.save(error="no batch ran: see configs")
        return
    report.save(batch_per_gpu=batch)
    at = [*base, f"data.batch_size={batch}"]
    # The reference loss through DeepSpeed, then the plain torch baseline with it, in one command.
    configs["reference, synthetic; plain torch, reference loss, synthetic"] = slip_json([*at, "--compare", "loss.backend=reference", "--plain-baseline"],
                                                                                      left(deadline))  # fmt: skip
    report.save(configs=configs)
    data = photos(work, PHOTOS, min(40.0, left(deadline))) if dali() else None
    if data is None:
        report.save(dali="skipped: no DALI" if not dali() else "skipped: the photos could not be made")
        return
    configs["triton, DALI"] = slip_json([*at, "--compare", f"data.loader=dali data.train={data} loss.backend=triton"], left(deadline))
    report.save(configs=configs)


def step_pipeline(report: Report, deadline: float, work: Path) -> None:
    if not dali():
        report.save(skipped="no DALI")
        return
    n, args = (PHOTOS, ["--device", "gpu", "--batch-size", "256", "--workers", "16", "--steps", "10"]) if cuda() else \
        (64, ["--device", "cpu", "--batch-size", "16", "--workers", "2", "--steps", "2"])  # fmt: skip
    data = photos(work, n, left(deadline) / 2)
    if data is None:
        report.save(error="the photos could not be generated and converted")
        return
    report.save(profile=slip_json(["profile", "pipeline", "--data", str(data), *args], left(deadline)))
    if not cuda():
        report.save(skipped="no CUDA (the CPU graph ran instead, briefly)")


STEPS = {"env": step_env, "tests": step_tests, "loss": step_loss, "step": step_step, "pipeline": step_pipeline}


def report_path(out: Path, name: str) -> Path:
    return out / f"{list(STEPS).index(name) + 1}-{name}.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the JSON reports")
    parser.add_argument("--work", default="/tmp/slip-gpu-check", help="scratch folder for generated data")
    parser.add_argument("--only", help="comma-separated steps (default: all, in order)")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget (default 1)")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process of one step
    args = parser.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    budgets = {name: seconds * args.budget_scale for name, seconds in BUDGETS.items()}
    if args.step:
        signal.signal(signal.SIGTERM, _on_term)
        report = Report(report_path(out, args.step), args.step)
        STEPS[args.step](report, time.monotonic() + budgets[args.step] - 5, work)  # 5 s to spare for the last save
        report.save()
        return 0
    names = args.only.split(",") if args.only else list(STEPS)
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    summary = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CI": "true"}
    for name in names:
        started, path = time.monotonic(), report_path(out, name)
        path.unlink(missing_ok=True)
        proc = sh([sys.executable, str(Path(__file__).resolve()), "--step", name, "--out", str(out), "--work", str(work),
                   "--budget-scale", str(args.budget_scale)], budgets[name], env=env)  # fmt: skip
        if proc.returncode != 0:  # killed at its budget, or crashed: say so beside what it saved
            saved = json.loads(path.read_text()) if path.is_file() else {"step": name}
            saved.update(timed_out=proc.returncode == -9, returncode=proc.returncode, stderr_tail=proc.stderr[-3000:])
            path.write_text(json.dumps(saved, indent=2) + "\n")
        summary[name] = {"seconds": round(time.monotonic() - started, 1), "returncode": proc.returncode}
        print(f"gpu-check: {name}: {summary[name]['seconds']} s -> {path}", flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
