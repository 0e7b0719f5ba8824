//! The SIMT matmul kernel against a CPU f64 reference: odd shapes, transposes, batches,
//! accumulation, f16/bf16 storage, offsets, and operands larger than one storage binding.
//! Runs on any adapter (lavapipe in CI) and fails when there is none.

mod wgsl_matmul_support;

use ferrotune::backend::wgsl::matmul::{plan_matmul, KernelChoice};
use ferrotune::backend::wgsl::{BufSlice, MatmulArgs, MatmulKernel, WgslOptions};
use ferrotune::DType;
use wgsl_matmul_support::{check, context, Case};

/// f32 storage: the kernel's only error is f32 rounding in a different order.
const TOL_F32: f64 = 1e-5;
/// f16/bf16 storage: the reference uses the same rounded inputs, so the error is again
/// only f32 accumulation; the bound asked of half storage is 1e-2, we hold it to 1e-5.
const TOL_HALF: f64 = 1e-5;

// Covers every tile shape: tiny, 64 x 64, thin rows (m <= 4, m <= 16), thin columns.
const SHAPES: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (17, 33, 65),
    (129, 7, 300),
    (64, 64, 64),
    (5, 130, 12),
    (100, 68, 36),
    (3, 300, 21),
    (133, 2, 40),
];

#[test]
fn f32_odd_shapes_all_transposes() {
    let ctx = context();
    let mut seed = 0;
    for &(m, n, k) in &SHAPES {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            seed += 1;
            check(&ctx, &Case::new(m, n, k).trans(ta, tb), seed, TOL_F32);
        }
    }
}

#[test]
fn f32_large_tiles_and_vector_loads() {
    let ctx = context();
    // Big enough for the 128 x 128 tiles; multiples of 4 take the vec4 path, 521 does not.
    for (i, &(m, n, k)) in [(520, 516, 36), (521, 515, 37)].iter().enumerate() {
        for (ta, tb) in [(false, false), (true, true), (true, false)] {
            let o = check(&ctx, &Case::new(m, n, k).trans(ta, tb), 100 + i as u64, TOL_F32);
            assert!(matches!(o.kernel, KernelChoice::Simt { bm: 128, .. }), "{:?}", o.kernel);
        }
    }
}

#[test]
fn alpha_and_accumulate() {
    let ctx = context();
    for (i, &(m, n, k)) in [(17, 33, 65), (64, 64, 64), (130, 129, 9)].iter().enumerate() {
        let mut c = Case::new(m, n, k).trans(i == 1, i == 2);
        c.alpha = -0.37;
        c.accumulate = true;
        check(&ctx, &c, 200 + i as u64, TOL_F32);
        c.accumulate = false;
        c.alpha = 2.5;
        check(&ctx, &c, 210 + i as u64, TOL_F32);
    }
}

#[test]
fn batched_strided_and_broadcast() {
    let ctx = context();
    let mut c = Case::new(33, 20, 17).trans(true, false);
    c.batch = 3;
    check(&ctx, &c, 300, TOL_F32);
    // B shared by every batch (stride 0), C with a gap between batches (left untouched).
    let mut c = Case::new(12, 16, 8).trans(false, true);
    c.batch = 4;
    c.stride_b = Some(0);
    c.stride_c = Some(12 * 16 + 40);
    c.accumulate = true;
    check(&ctx, &c, 301, TOL_F32);
    // A with a padded batch stride, bf16 B.
    let mut c = Case::new(9, 31, 40).dtypes(DType::F32, DType::BF16);
    c.batch = 2;
    c.stride_a = Some(9 * 40 + 8);
    check(&ctx, &c, 302, TOL_HALF);
}

#[test]
fn half_storage_dtypes() {
    let ctx = context();
    let combos = [
        (DType::F16, DType::F16),
        (DType::BF16, DType::BF16),
        (DType::F32, DType::F16),
        (DType::BF16, DType::F32),
        (DType::F16, DType::BF16),
    ];
    let mut seed = 400;
    for (da, db) in combos {
        for &(m, n, k) in &[(17, 33, 65), (64, 32, 48), (3, 129, 301)] {
            for (ta, tb) in [(false, false), (true, true)] {
                seed += 1;
                check(&ctx, &Case::new(m, n, k).trans(ta, tb).dtypes(da, db), seed, TOL_HALF);
            }
        }
    }
}

#[test]
fn f16_without_shader_f16_reads_packed_pairs() {
    let mut ctx = context();
    ctx.has_f16 = false;
    let mut seed = 500;
    for &(m, n, k) in &[(17, 33, 65), (64, 32, 48)] {
        for (ta, tb) in [(false, false), (true, true), (false, true)] {
            seed += 1;
            check(
                &ctx,
                &Case::new(m, n, k).trans(ta, tb).dtypes(DType::F16, DType::F16),
                seed,
                TOL_HALF,
            );
        }
    }
}

#[test]
fn unaligned_offsets_and_guards() {
    let ctx = context();
    // Offsets that are not multiples of 256 (nor of 16): bindings start at the aligned byte
    // below and the kernel adds the remainder.
    let mut c = Case::new(19, 21, 23).dtypes(DType::F32, DType::F16);
    c.offsets = [4, 258, 512 + 12];
    check(&ctx, &c, 600, TOL_HALF);
    let mut c = Case::new(64, 64, 64).dtypes(DType::BF16, DType::F32).trans(true, false);
    c.offsets = [256, 1024, 768];
    c.accumulate = true;
    check(&ctx, &c, 601, TOL_HALF);
}

#[test]
fn checked_shader_modules() {
    let ctx = ferrotune::backend::wgsl::WgslContext::new_blocking(WgslOptions {
        checked: Some(true),
        ..Default::default()
    })
    .expect("the WGSL matmul tests need a GPU adapter (lavapipe is enough)");
    assert!(!ctx.trusted);
    check(&ctx, &Case::new(17, 33, 65).trans(true, false), 700, TOL_F32);
}

/// B is 8192 x 4200 f32 = 137.6 MB, over the 128 MiB binding limit of lavapipe and of the
/// smallest targets: it is bound in slices (K is split and accumulated when B is [K, N]; N
/// is split when B is [N, K]). The test plans with a 64 MiB limit, so slicing is exercised
/// on every adapter, whatever its own limit.
#[test]
fn operand_larger_than_one_binding() {
    let mut ctx = context();
    ctx.limits.max_storage_buffer_binding_size = ctx.limits.max_storage_buffer_binding_size.min(64 << 20);
    let (m, n, k) = (3, 4200, 8192);
    assert!((n * k * 4) as u64 > 128 << 20);
    for (i, tb) in [false, true].into_iter().enumerate() {
        let o = check(&ctx, &Case::new(m, n, k).trans(false, tb), 800 + i as u64, TOL_F32);
        assert!(
            o.dispatches > 1,
            "B exceeds the binding limit but was bound in one piece"
        );
    }
    // Batches of a 45 MB B: one batch fits a binding, all three do not.
    let mut c = Case::new(2, 11000, 1024).trans(false, false);
    c.batch = 3;
    let o = check(&ctx, &c, 810, TOL_F32);
    assert!(
        o.dispatches > 1,
        "three batches of B exceed the binding limit but were bound at once"
    );
}

/// One row of C with 16.8 M columns: with 256-column tiles that is more than the 65535
/// workgroups a dispatch may have along one dimension, so the columns are split.
#[test]
fn more_than_65535_workgroups() {
    let ctx = context();
    let n = 65535 * 256 + 300;
    let o = check(&ctx, &Case::new(1, n, 1), 900, TOL_F32);
    assert!(matches!(o.kernel, KernelChoice::Simt { bn: 256, .. }), "{:?}", o.kernel);
    assert!(o.dispatches >= 2, "{} dispatches", o.dispatches);
}

#[test]
fn bad_arguments_are_errors() {
    let ctx = context();
    let a = ctx.create_buffer("a", 64 * 4).unwrap();
    let b = ctx.create_buffer("b", 64 * 4).unwrap();
    let c = ctx.create_buffer("c", 64 * 4).unwrap();
    let base = MatmulArgs::new(BufSlice::whole(&a), BufSlice::whole(&b), BufSlice::whole(&c), 8, 8, 8);

    let mut args = base;
    args.a_dtype = DType::I32;
    let e = plan_matmul(&ctx, &args).unwrap_err().to_string();
    assert!(e.contains("f32, f16 or bf16"), "{e}");

    let mut args = base;
    args.k = 9;
    let e = plan_matmul(&ctx, &args).unwrap_err().to_string();
    assert!(e.contains("needs") && e.contains("bytes"), "{e}");

    let mut args = base;
    args.c = BufSlice::whole(&a);
    let e = plan_matmul(&ctx, &args).unwrap_err().to_string();
    assert!(e.contains("different buffer"), "{e}");

    let mut args = base;
    args.batch = 2;
    args.batch_stride_c = Some(10);
    args.batch_stride_a = Some(0);
    args.batch_stride_b = Some(0);
    let e = plan_matmul(&ctx, &args).unwrap_err().to_string();
    assert!(e.contains("overwrite"), "{e}");

    if !ctx.has_coop_matrix {
        let mut args = base;
        args.kernel = MatmulKernel::Coop;
        let e = plan_matmul(&ctx, &args).unwrap_err().to_string();
        assert!(e.contains("cooperative"), "{e}");
    }
}
