//! No shader folds an infinite or NaN `f32` out of a constant bit pattern.
//!
//! WGSL makes a const-expression whose value is not finite a shader-creation error (WGSL
//! spec, "Floating Point Evaluation" / const-expression overflow): browsers' compiler
//! (Tint, in Chromium) rejects `bitcast<f32>(0xff800000u)` or a bitcast of a `const`
//! holding those bits, while naga (native wgpu) accepts it, so native tests alone do not
//! catch it. Such values must come through a variable (`nan_f32()`, `neg_inf_f32()` in
//! shaders/common.wgsl).

use std::collections::HashMap;

/// `0x...u` / `123u` / `0x...` as a u32.
fn parse_u32(lit: &str) -> Option<u32> {
    let s = lit.trim().trim_end_matches('u');
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// `const NAME: u32 = LIT;` / `const NAME = LIT;` declarations with an integer literal.
fn u32_consts(src: &str) -> HashMap<String, u32> {
    let mut out = HashMap::new();
    for line in src.lines() {
        let Some(rest) = line.trim().strip_prefix("const ") else {
            continue;
        };
        let Some((lhs, rhs)) = rest.split_once('=') else {
            continue;
        };
        let name = lhs.split(':').next().unwrap_or("").trim().to_string();
        if let Some(v) = parse_u32(rhs.trim().trim_end_matches(';')) {
            out.insert(name, v);
        }
    }
    out
}

/// Every `bitcast<f32>(ARG)` whose ARG is a literal or a known constant giving a
/// non-finite f32: (line number, ARG).
fn non_finite_bitcasts(src: &str, consts: &HashMap<String, u32>) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        let mut rest = line.split("//").next().unwrap_or("");
        while let Some(p) = rest.find("bitcast<f32>(") {
            let after = &rest[p + "bitcast<f32>(".len()..];
            let arg = after.split(')').next().unwrap_or("").trim();
            let bits = parse_u32(arg).or_else(|| consts.get(arg).copied());
            if bits.is_some_and(|b| !f32::from_bits(b).is_finite()) {
                out.push((i + 1, arg.to_string()));
            }
            rest = after;
        }
    }
    out
}

fn shader_sources() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).expect("shaders/ is readable") {
        let p = e.expect("directory entry").path();
        if p.extension().is_some_and(|x| x == "wgsl") {
            let text = std::fs::read_to_string(&p).expect("shader is UTF-8");
            out.push((p.file_name().unwrap().to_string_lossy().into_owned(), text));
        }
    }
    assert!(out.len() >= 5, "expected the shader files under {}", dir.display());
    out
}

#[test]
fn the_check_finds_folded_infinities_and_nans() {
    let bad = "const NEG_INF_BITS: u32 = 0xff800000u;\n\
               fn f() -> f32 { return bitcast<f32>(NEG_INF_BITS); }\n\
               fn g() -> f32 { return bitcast<f32>(0x7fc00000u); }\n\
               fn h() -> f32 { return bitcast<f32>(0x3f800000u); }\n\
               fn k(w: u32) -> f32 { return bitcast<f32>(w << 16u); }\n\
               // a comment: bitcast<f32>(0xff800000u)\n";
    let found = non_finite_bitcasts(bad, &u32_consts(bad));
    assert_eq!(
        found,
        vec![(2, "NEG_INF_BITS".to_string()), (3, "0x7fc00000u".to_string())]
    );
}

#[test]
fn no_shader_folds_a_non_finite_f32() {
    let files = shader_sources();
    // Constants are visible across the files concatenated into one module (common.wgsl first).
    let mut consts = HashMap::new();
    for (_, src) in &files {
        consts.extend(u32_consts(src));
    }
    let mut bad = Vec::new();
    for (name, src) in &files {
        for (line, arg) in non_finite_bitcasts(src, &consts) {
            bad.push(format!("shaders/{name}:{line}: bitcast<f32>({arg})"));
        }
    }
    assert!(
        bad.is_empty(),
        "constant bitcasts to a non-finite f32 (browsers reject them; use a variable): {bad:?}"
    );
}
