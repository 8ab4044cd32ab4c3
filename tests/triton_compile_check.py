"""Ahead-of-time compilation of every Triton kernel for Ampere (sm80) and Hopper (sm90).

    python tests/triton_compile_check.py [80 90]

Run by tests/test_triton_compile.py in a child process: Triton decides when it is first
imported whether its @jit code (its own standard library included) is compiled or
interpreted, and the interpreter tests need the other choice, so they cannot share a process.

No GPU is needed: triton.compile lowers a kernel through TTIR, TTGIR, LLVM IR and PTX to a
cubin with the ptxas that ships in the triton wheel, for a GPUTarget we name. This catches
what the interpreter cannot: type errors of the compiled dialect, tl.dot shape and layout
constraints, scans over (fp64, int32) tuples, atomics, shared-memory overflow of the
autotune configs. Every autotune config of the fused kernels is compiled in bf16, and the
fp32 variant with the first config (fp16 lowers like bf16); the row and scan kernels in
their constexpr variants. One line per kernel gives registers and spills as ptxas reports them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled, not interpreted

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pear_kernels.kernels import triton_distill, triton_fused, triton_options, triton_rows, triton_scan  # noqa: E402

ARCHS = (80, 90)
DT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _jit(fn):
    while not isinstance(fn, triton.runtime.JITFunction):
        fn = fn.fn  # unwrap @triton.autotune
    return fn


def _ptxas_usage(ptx: str, arch: int):
    """(registers, spill-store bytes) from ptxas -v on the PTX, with the bundled ptxas."""
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", os.path.join(tmp, "k.o")],
            capture_output=True, text=True, check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else 0


# Integer arguments that are multiples of 16 at real shapes (H, V and the row strides of
# 2048/896/4096-wide hidden states and 151936/128256/262144-row heads): the launcher marks them
# tt.divisibility=16 exactly as it marks 16-byte-aligned pointers (every torch allocation is).
DIVISIBLE_INTS = {"Hdim", "V", "stride_h", "stride_w", "stride_l", "R_BUCKET"}


def launch_attrs(fn, signature):
    """The specialisation attributes the launcher passes at a real launch (see Triton's
    BaseBackend.get_tensor_specialization / get_int_specialization): compiling without them
    compiles another kernel (scalar loads instead of vectorised/async copies, other register
    counts) than the one that runs."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        ty = signature.get(name)
        if ty is None or ty == "constexpr":
            continue
        if ty.startswith("*") or name in DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _compile(fn, signature, constexprs, arch, num_warps=4, num_stages=3):
    fn = _jit(fn)
    sig = dict(signature)
    for k in constexprs:
        sig[k] = "constexpr"
    missing = set(fn.arg_names) ^ set(sig)
    assert not missing, f"{fn.__name__}: signature mismatch {missing}"
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=launch_attrs(fn, sig))
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
    regs, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    ptx = compiled.asm["ptx"]
    async_copies = len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)) + len(re.findall(r"cp\.async\.bulk", ptx))
    vector_loads = len(re.findall(r"ld\.global(?:\.\w+)*\.v[248]", ptx))
    label = " ".join(f"{k}={v}" for k, v in constexprs.items() if k != "PRECISION")
    print(f"sm{arch} {fn.__name__:<22} warps={num_warps} stages={num_stages} {label}: "
          f"{regs} registers, {spills} B spilled, {compiled.metadata.shared} B smem, "
          f"{async_copies} async copies, {vector_loads} vector loads", flush=True)
    return {"regs": regs, "spills": spills, "smem": compiled.metadata.shared, "async": async_copies,
            "vector_loads": vector_loads}


def compile_row_kernels(arch):
    common = {"L_ptr": "*fp32", "stride_l": "i64", "Y_ptr": "*i64", "V": "i32", "inv_temp": "fp32"}
    for ent in (False, True):
        _compile(triton_rows._row_stats_kernel,
                 {**common, "LOGP_ptr": "*fp32", "LSE_ptr": "*fp32", "ENT_ptr": "*fp32"},
                 {"BLOCK_V": triton_rows.MAX_BLOCK_V, "WITH_ENTROPY": ent}, arch, num_warps=4)
    _compile(triton_rows._row_dlogits_kernel, {**common, "LSE_ptr": "*fp32", "COEF_ptr": "*fp32"},
             {"BLOCK_V": triton_rows.MAX_BLOCK_V}, arch, num_warps=4)


def compile_option_kernels(arch):
    """The loss options' row kernels (softcap, label smoothing's mean, z-loss's lse) in every
    constexpr combination, on fp32 logits chunks and on 16-bit ones (their dlogits are
    written back in the buffer's dtype)."""
    for dt in ("fp32", "bf16"):
        common = {"L_ptr": DT[dt], "stride_l": "i64", "Y_ptr": "*i64", "V": "i32", "inv_temp": "fp32",
                  "cap": "fp32", "inv_cap": "fp32"}
        for cap in (False, True):
            for mean in (False, True):
                for ent in (False, True) if dt == "fp32" else (False,):
                    _compile(triton_options._option_stats_kernel,
                             {**common, "LOGP_ptr": "*fp32", "LSE_ptr": "*fp32", "MEAN_ptr": "*fp32",
                              "ENT_ptr": "*fp32"},
                             {"BLOCK_V": triton_rows.MAX_BLOCK_V, "SOFTCAP": cap, "WITH_MEAN": mean,
                              "WITH_ENTROPY": ent}, arch, num_warps=4)
            _compile(triton_options._option_dlogits_kernel,
                     {**common, "LSE_ptr": "*fp32", "F_ptr": "*fp32", "T_ptr": "*fp32", "U_ptr": "*fp32"},
                     {"BLOCK_V": triton_rows.MAX_BLOCK_V, "SOFTCAP": cap}, arch, num_warps=4)


def compile_distill_kernels(arch):
    """The distillation row kernels (fp32 chunks; K = 20 teacher ids padded to 32)."""
    common = {"L_ptr": "*fp32", "stride_l": "i64", "Y_ptr": "*i64", "IDS_ptr": "*i64", "stride_ids": "i64",
              "V": "i32", "K": "i32"}
    _compile(triton_distill._stats_kernel, {**common, "SY_ptr": "*fp32", "STOP_ptr": "*fp32", "LSE_ptr": "*fp32"},
             {"BLOCK_V": triton_rows.MAX_BLOCK_V, "BLOCK_K": 32}, arch, num_warps=4)
    for has_c in (False, True):
        _compile(triton_distill._dlogits_kernel,
                 {**common, "LSE_ptr": "*fp32", "A_ptr": "*fp32", "B_ptr": "*fp32", "C_ptr": "*fp32"},
                 {"BLOCK_V": triton_rows.MAX_BLOCK_V, "BLOCK_K": 32, "HAS_C": has_c}, arch, num_warps=4)


def compile_scan_kernels(arch):
    for block, warps in ((1024, 4), (triton_scan.MAX_SCAN_BLOCK, 8)):
        _compile(triton_scan._pear_scan_kernel,
                 {"LOGP_ptr": "*fp32", "BEH_ptr": "*fp64", "SEQ_END_ptr": "*i64", "D_ptr": "*fp64",
                  "INCL_ptr": "*fp64", "PARAMS_ptr": "*fp64", "start": "i32", "end": "i32", "M": "i32"},
                 {"BLOCK": block}, arch, num_warps=warps)
    for variant in triton_scan.VARIANT_CODES.values():
        for write in (True,) if variant != 1 else (False, True):
            _compile(triton_scan._pear_weights_kernel,
                     {"D_ptr": "*fp64", "INCL_ptr": "*fp64", "N_AFTER_ptr": "*i64", "BLOCK_END_ptr": "*i64",
                      "SEQ_START_ptr": "*i64", "SEQ_END_ptr": "*i64", "LOGW_RAW_ptr": "*fp64",
                      "COEF_ptr": "*fp32" if write else "*fp64", "PARAMS_ptr": "*fp64",
                      "start": "i32", "end": "i32", "M": "i32", "scale": "fp32"},
                     {"VARIANT": variant, "WRITE_COEF": write, "BLOCK": triton_scan.WEIGHT_BLOCK}, arch)


def _fused_cases(configs):
    return [(cfg, "bf16") for cfg in configs] + [(configs[0], "fp32")]


def compile_fused_forward(arch):
    for cfg, dt in _fused_cases(triton_fused.forward_configs(arch // 10)):
        sig = {"H_ptr": DT[dt], "W_ptr": DT[dt], "B_ptr": DT[dt], "ROW_ptr": "*i64", "Y_ptr": "*i64",
               "M_ptr": "*fp32", "S_ptr": "*fp32", "T_ptr": "*fp32", "ZY_ptr": "*fp32",
               "R": "i32", "R_BUCKET": "i32", "Hdim": "i32", "V": "i32", "SPLITS": "i32", "stride_h": "i32",
               "stride_w": "i32",
               "inv_temp": "fp32"}
        const = {"HAS_BIAS": True, "WITH_ENTROPY": True, "UPCAST": dt == "fp32",
                 "PRECISION": "ieee" if dt == "fp32" else "tf32", **cfg.kwargs}
        _check_16bit(dt, _compile(triton_fused._fused_forward_kernel, sig, const, arch, cfg.num_warps,
                                  cfg.num_stages), "forward", cfg)


def compile_fused_backward(arch):
    for cfg, dt in _fused_cases(triton_fused.backward_configs(arch // 10)):
        sig = {"H_ptr": DT[dt], "W_ptr": DT[dt], "B_ptr": DT[dt], "ROW_ptr": "*i64", "Y_ptr": "*i64",
               "LSE_ptr": "*fp32", "COEF_ptr": "*fp32", "DH_ptr": "*fp32", "DW_ptr": "*fp32", "DB_ptr": "*fp32",
               "R": "i32", "R_BUCKET": "i32", "Hdim": "i32", "V": "i32", "stride_h": "i32", "stride_w": "i32",
               "inv_temp": "fp32"}
        const = {"HAS_BIAS": True, "NEED_DH": True, "NEED_DW": True, "NEED_DB": True,
                 "UPCAST": dt == "fp32", "PRECISION": "ieee" if dt == "fp32" else "tf32", **cfg.kwargs}
        _check_16bit(dt, _compile(triton_fused._fused_backward_kernel, sig, const, arch, cfg.num_warps,
                                  cfg.num_stages), "backward", cfg)


def _check_16bit(dt, report, which, cfg):
    """Every 16-bit autotune config of the fused kernels compiles, with the launcher's
    attributes, to a kernel that does not spill and that streams its operand tiles with
    asynchronous copies (cp.async on sm80, cp.async/TMA-class copies on sm90). The fp32
    (UPCAST) variants are reported, not asserted: see docs/triton_backend.md."""
    if dt == "fp32":
        return
    assert report["spills"] == 0, f"fused {which} {cfg}: {report['spills']} B spilled"
    assert report["async"] > 0, f"fused {which} {cfg}: no asynchronous copies"


def main(archs) -> int:
    for arch in archs:
        for step in (compile_row_kernels, compile_option_kernels, compile_distill_kernels, compile_scan_kernels,
                     compile_fused_forward, compile_fused_backward):
            step(arch)
    print(f"OK: every kernel compiled for {', '.join(f'sm{a}' for a in archs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main([int(a) for a in sys.argv[1:]] or list(ARCHS)))
