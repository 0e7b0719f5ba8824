//! Every CUDA kernel family compiles with NVRTC for the GPUs we build for (needs only the
//! NVRTC library, no GPU). The assembler's resource report is printed: registers, shared
//! memory and spill bytes per kernel.
#![cfg(feature = "cuda")]

use ferrotune::backend::cuda::compile_all_kernels;

#[test]
fn kernels_compile_for_ampere_and_hopper() {
    for arch in ["sm_80", "sm_90"] {
        let logs = compile_all_kernels(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        assert_eq!(logs.len(), ferrotune::backend::cuda::kernels::Family::ALL.len());
        for (file, log) in logs {
            eprintln!("== {arch} {file}\n{log}");
            assert!(!log.contains("error"), "{arch} {file}: {log}");
        }
    }
}
