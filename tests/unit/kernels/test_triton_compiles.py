"""The triton kernels compile for an H100/H200 (sm_90) as Hopper code: wgmma, no spills.

The interpreter the other triton tests use runs Python semantics and accepts things the
compiler rejects (a kernel reading a plain module-level float, for one). Compiling needs no
GPU, only Triton's bundled ptxas, so this runs everywhere; in a subprocess, because the test
session runs Triton in interpreter mode. Each configuration the autotuner may pick is compiled
with the divisibility hints the runtime adds at the sizes that matter (pointers, widths and
strides multiple of 16), and for each:
- the PTX issues Hopper's warpgroup MMA (`wgmma.mma_async`), not only Ampere's `mma.sync`;
- bf16 embeddings never go through TF32 (their products, gradient ones included, are bf16 dots);
- ptxas, asked for its report, spills no register (the gradient accumulators live in registers).
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_lse as T

ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
ints = {"b": "i32", "n": "i32", "d": "i32", "stride_p": "i32", "stride_q": "i32", "span": "i32", "mask_offset": "i64", "pos_offset": "i64"}
kernels = {
    "forward": (T._forward, "forward", ["p_ptr", "q_ptr", "scale_ptr", "max_ptr", "sum_ptr", "arg_ptr", "pos_ptr"]),
    "backward_rows": (T._backward_rows, "backward", ["p_ptr", "q_ptr", "scale_ptr", "lse_ptr", "grow_ptr", "gpos_ptr", "gp_ptr", "gscale_ptr"]),
    "backward_cols": (T._backward_cols, "backward", ["p_ptr", "q_ptr", "scale_ptr", "lse_ptr", "grow_ptr", "gpos_ptr", "gq_ptr"]),
}
names = {torch.float32: "fp32", torch.bfloat16: "bf16"}
for name, (fn, stage, pointers) in kernels.items():
    for dtype, configs in T.CONFIGS[stage].items():
        for cfg in configs:
            types = {"arg_ptr": "*i64", "p_ptr": f"*{names[dtype]}", "q_ptr": f"*{names[dtype]}"}
            signature = {p: types.get(p, "*fp32") for p in pointers} | ints | {k: "constexpr" for k in cfg.kwargs}
            hinted = [*pointers, "n", "d", "stride_p", "stride_q", "span"]
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=dict(cfg.kwargs), attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
            ptx = compiled.asm["ptx"]
            with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                f.write(ptx)
            report = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True).stderr
            os.unlink(f.name)
            spills = [int(s) for s in re.findall(r"(\d+) bytes spill stores", report)]
            print(json.dumps({"kernel": name, "dtype": names[dtype], "config": str(cfg), "wgmma": "wgmma.mma_async" in ptx,
                              "tf32": "tf32" in ptx, "spill_bytes": sum(spills), "reported": bool(spills)}))
"""


def test_every_configuration_compiles_for_sm90_to_wgmma_without_spills() -> None:
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["dtype"]) for r in results} == {(k, t) for k in ("forward", "backward_rows", "backward_cols") for t in ("fp32", "bf16")}
    for r in results:
        assert r["wgmma"], r
        assert r["reported"] and r["spill_bytes"] == 0, r
        assert not (r["dtype"] == "bf16" and r["tf32"]), r
