"""The triton kernels compile for an H100/H200 (sm_90) and use its tensor cores.

The interpreter the other triton tests use runs Python semantics and accepts things the
compiler rejects (a kernel reading a plain module-level float, for one). Compiling needs no
GPU, only Triton's bundled ptxas, so this runs everywhere; in a subprocess, because the
test session runs Triton in interpreter mode.
"""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import triton_lse as T

common = {"b": "i32", "n": "i32", "d": "i32", "stride_p": "i32", "stride_q": "i32", "mask_offset": "i64",
          "pos_offset": "i64", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"}
kernels = {
    "forward": (T._forward, ["p_ptr", "q_ptr", "scale_ptr", "lse_ptr", "lost_ptr", "max_ptr", "arg_ptr", "pos_ptr"]),
    "backward_rows": (T._backward_rows, ["p_ptr", "q_ptr", "scale_ptr", "lse_ptr", "grow_ptr", "gpos_ptr", "gp_ptr", "gscale_ptr"]),
    "backward_cols": (T._backward_cols, ["p_ptr", "q_ptr", "scale_ptr", "lse_ptr", "grow_ptr", "gpos_ptr", "gq_ptr"]),
}
for dtype in ("fp32", "bf16"):  # the embeddings' dtype: p and q
    for name, (fn, pointers) in kernels.items():
        types = {"arg_ptr": "*i64", "p_ptr": f"*{dtype}", "q_ptr": f"*{dtype}"}
        signature = {p: types.get(p, "*fp32") for p in pointers} | common
        constexprs = {"BLOCK_M": T.BLOCK_M, "BLOCK_N": T.BLOCK_N, "BLOCK_K": T.BLOCK_K}
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        print(dtype, name, "mma" in compiled.asm["ptx"])
"""


def test_kernels_compile_for_sm90_with_tensor_cores() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    want = [f"{dtype} {name} True" for dtype in ("fp32", "bf16") for name in ("forward", "backward_rows", "backward_cols")]
    assert run.stdout.split("\n")[:6] == want, run.stdout
