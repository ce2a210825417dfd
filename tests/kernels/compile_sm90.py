"""Compile every Triton kernel ahead of time for an H100/H200 (sm_90) — no GPU needed: Triton's
own LLVM and ptxas do it. Catches what the interpreter cannot: type errors of loop-carried
values, tl.dot shape/dtype rules, bf16 code paths. Run by test_compile_sm90.py in a subprocess
(non-interpreted triton, private cache dir). Prints one line per compiled kernel variant."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moslim_mega.kernels import linear_logprob as L
from moslim_mega.kernels import multihead_head as M

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict, consts: dict) -> None:
    """Pointer/float arguments typed by ``types``; the rest i32; ``consts`` are the constexprs."""
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET)
    assert kernel.asm.get("cubin"), fn.__name__
    print("compiled", fn.__name__, consts)


def main() -> None:
    f32 = "*fp32"
    for dt in ("fp32", "bf16"):
        ieee = dt == "fp32"
        compile_kernel(L._chunk_stats_kernel, {"z_ptr": f"*{dt}", "tgt_ptr": "*i64", "m_ptr": f32, "s_ptr": f32,
                                               "zs_ptr": f32, "tl_ptr": f32, "inv_temp": "fp32"},
                       {"BLOCK_N": L.BLOCK_N, "BLOCK_V": L.BLOCK_V})
        compile_kernel(L._chunk_grad_kernel, {"z_ptr": f32, "dz_ptr": f"*{dt}", "tgt_ptr": "*i64", "logz_ptr": f32,
                                              "meanz_ptr": f32, "glp_ptr": f32, "gent_ptr": f32, "inv_temp": "fp32"},
                       {"BLOCK_N": L.BLOCK_N, "BLOCK_V": L.BLOCK_V})
        blocks = {"BLOCK_B": M.BLOCK_B, "BLOCK_D": M.BLOCK_D, "BLOCK_C": 16, "IEEE": ieee}
        fwd = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "col_head_ptr": "*i32",
               "col_local_ptr": "*i32", "cw_ptr": f32, "y_ptr": "*i64", "logp_ptr": f32, "num_ptr": f32,
               "den_ptr": f32, "mean_ptr": f32, "std_ptr": f32, "reward_ptr": f32, "clip": "fp32"}
        compile_kernel(M._head_fwd_kernel, fwd, {"MODE": 0, "KIND": 0, "NORM_ALL": True, **blocks})
        for kind in range(3):
            for norm_all in (True, False):
                compile_kernel(M._head_fwd_kernel, fwd, {"MODE": 1, "KIND": kind, "NORM_ALL": norm_all, **blocks})
        grad = {"logp_ptr": f32, "y_ptr": "*i64", "cw_ptr": f32, "gtot_ptr": f32, "ghead_ptr": f32, "den_ptr": f32,
                "col_head_ptr": "*i32", "col_local_ptr": "*i32"}
        compile_kernel(M._head_bwd_hidden_kernel, {**grad, "w_ptr": f"*{dt}", "dh_ptr": f"*{dt}"}, blocks)
        compile_kernel(M._head_bwd_weight_kernel, {**grad, "h_ptr": f"*{dt}", "dw_ptr": f"*{dt}", "db_ptr": f"*{dt}"},
                       blocks)
    compile_kernel(M._head_finalize_kernel, {"num_ptr": f32, "den_ptr": f32, "col_head_ptr": "*i32", "loss_ptr": f32,
                                             "total_ptr": f32, "den_out_ptr": f32}, {"BLOCK_P": 64, "BLOCK_C": 16})


if __name__ == "__main__":
    main()
