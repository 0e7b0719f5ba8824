//! The cooperative-matrix (tensor core) matmul.
//!
//! Everywhere: every variant of its shader parses, validates and compiles to SPIR-V with
//! naga (the compiler wgpu uses), so a shader bug shows up without the hardware.
//! On adapters with 16x16x16 f16 -> f32 cooperative matrices (e.g. NVIDIA over Vulkan): the
//! kernel against the CPU f64 reference on odd shapes, transposes, batches and accumulation.
//! `auto` takes it exactly where the adapter offers it and the SIMT f16 path elsewhere
//! (lavapipe, browsers), with correct results either way.

mod wgsl_matmul_support;

use ferrotune::backend::wgsl::matmul::{coop_shader_sources, KernelChoice};
use ferrotune::backend::wgsl::MatmulKernel;
use ferrotune::DType;
use wgsl_matmul_support::{check, context, Case};

fn compile_to_spirv(src: &str, policy: naga::proc::BoundsCheckPolicy) -> Vec<u32> {
    let module = naga::front::wgsl::parse_str(src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    // What wgpu grants a Vulkan device with SHADER_F16 and cooperative matrices.
    let caps = naga::valid::Capabilities::COOPERATIVE_MATRIX
        | naga::valid::Capabilities::SHADER_FLOAT16
        | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}", e.emit_to_string(src)));
    let options = naga::back::spv::Options {
        lang_version: (1, 6),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: policy,
            buffer: policy,
            image_load: policy,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        ..Default::default()
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: "main".into(),
    };
    naga::back::spv::write_vec(&module, &info, &options, Some(&pipeline)).expect("SPIR-V output")
}

#[test]
fn coop_shader_variants_compile() {
    // OpCooperativeMatrixMulAddKHR and the load/store opcodes must appear in the output.
    const MUL_ADD: u32 = 4459;
    const LOAD: u32 = 4457;
    const STORE: u32 = 4458;
    for subgroup in [32, 64, 16] {
        for bk in [32, 16] {
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                for vec in [true, false] {
                    let sources = coop_shader_sources(subgroup, bk, ta, tb, vec);
                    // Eight subgroups (of 32 or 16) have two default tilings (64 x 64 and
                    // 32 x 64 blocks each); four (of 64) only the second.
                    assert_eq!(sources.len(), if subgroup == 64 { 1 } else { 2 }, "sg {subgroup}");
                    for src in sources {
                        for policy in [
                            naga::proc::BoundsCheckPolicy::Unchecked,
                            naga::proc::BoundsCheckPolicy::Restrict,
                        ] {
                            let words = compile_to_spirv(&src, policy);
                            let opcodes: Vec<u32> = spirv_opcodes(&words);
                            for op in [MUL_ADD, LOAD, STORE] {
                                assert!(
                                    opcodes.contains(&op),
                                    "opcode {op} missing (sg {subgroup}, bk {bk}, {ta} {tb} {vec})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Opcodes of a SPIR-V module's instructions (after the 5-word header).
fn spirv_opcodes(words: &[u32]) -> Vec<u32> {
    let mut out = Vec::new();
    let mut i = 5;
    while i < words.len() {
        let count = (words[i] >> 16) as usize;
        out.push(words[i] & 0xffff);
        i += count.max(1);
    }
    out
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for &(m, n, k) in &[
        (1, 1, 1),
        (17, 33, 65),
        (129, 7, 300),
        (128, 128, 64),
        (200, 264, 96),
        (255, 130, 70),
    ] {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            v.push(Case::new(m, n, k).trans(ta, tb).dtypes(DType::F16, DType::F16));
        }
    }
    let mut c = Case::new(40, 72, 48).dtypes(DType::F16, DType::F16).trans(false, true);
    c.batch = 3;
    v.push(c);
    let mut c = Case::new(100, 90, 80).dtypes(DType::F16, DType::F16);
    c.alpha = -0.5;
    c.accumulate = true;
    v.push(c);
    let mut c = Case::new(512, 384, 320).dtypes(DType::F16, DType::F16);
    c.offsets = [256, 512, 1024];
    v.push(c);
    v
}

#[test]
fn coop_matmul_matches_reference() {
    let ctx = context();
    assert!(
        ctx.has_coop_matrix,
        "adapter {} lacks 16x16x16 f16->f32 cooperative matrices, so the kernel cannot run here; \
         run this test on a GPU that has them (scripts/gpu-wgsl-matmul.sh), or skip it by name \
         (`--skip coop_matmul_matches_reference`, as scripts/test.sh does on lavapipe)",
        ctx.info.name
    );
    println!("adapter {}: running the cooperative-matrix kernel", ctx.info.name);
    for (i, case) in cases().into_iter().enumerate() {
        // f16 products are exact in f32; the tensor cores' f32 accumulation may round
        // differently from IEEE adds, hence a looser bound than the SIMT kernel's.
        let o = check(&ctx, &case.kernel(MatmulKernel::Coop), 1000 + i as u64, 1e-3);
        assert!(matches!(o.kernel, KernelChoice::Coop { .. }), "{:?}", o.kernel);
        println!("  {i}: max rel {:.2e}, Frobenius {:.2e}", o.max_rel, o.rel_fro);
    }
}

#[test]
fn auto_kernel_takes_coop_where_offered_and_simt_elsewhere() {
    let ctx = context();
    for (i, case) in cases().into_iter().enumerate() {
        // `auto` leaves products with a side under one 16x16 tile to the SIMT kernel.
        let (m, n, k) = (case.m, case.n, case.k);
        let coop = ctx.has_coop_matrix && m >= 16 && n >= 16 && k >= 16;
        let tol = if coop { 1e-3 } else { 1e-5 };
        let o = check(&ctx, &case.kernel(MatmulKernel::Auto), 2000 + i as u64, tol);
        let ran_coop = matches!(o.kernel, KernelChoice::Coop { .. });
        assert_eq!(ran_coop, coop, "case {i} ({m}x{n}x{k}) ran {:?}", o.kernel);
    }
}
