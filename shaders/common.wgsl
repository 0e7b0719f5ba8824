// Shared by every op kernel of the WGSL executor backend (prepended to each op file).
//
// Binding 0 is a uniform block `P` per dispatch: the element offset of every storage
// binding inside its bound window (`eo`, because a binding offset must be a multiple of
// 256 bytes), 16 op-specific integers (`u`) and 4 op-specific floats (`f`). Storage
// bindings 1..16 are declared by the host in the prelude, one per tensor name of the
// file, with typed accessors:
//   ld_X(i) -> f32            element i of a float tensor (f32, or f16/bf16 widened)
//   st_X(i, v)                f32 tensors only
//   st2_X(i, v0, v1, both)    elements i and i+1 (i even): an f16/bf16 tensor is stored as
//                             packed u32 pairs, so one invocation writes one whole word
//   ldi_X(i) -> i32, ldu_X(i) -> u32   integer tensors
// Every index is relative to the element offset of the binding's window.

struct Params {
    eo: array<vec4<u32>, 4>,
    u: array<vec4<u32>, 4>,
    f: vec4<f32>,
}

@group(0) @binding(0) var<uniform> P: Params;

fn eo(b: u32) -> u32 {
    return P.eo[b >> 2u][b & 3u];
}

fn pu(i: u32) -> u32 {
    return P.u[i >> 2u][i & 3u];
}

fn pf(i: u32) -> f32 {
    return P.f[i];
}

// Invocations per workgroup of the one-dimensional kernels (the browser's limit).
const WG: u32 = 256u;

// Index of a workgroup in a grid split over x and y (at most 65535 groups per dimension).
fn group_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// The largest finite f32, used as minus infinity in running maxima.
const NEG_BIG: f32 = -3.4028234663852886e38;

fn is_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u;
}

fn nan_f32() -> f32 {
    // Through a variable: WGSL forbids a NaN in a constant expression, and browsers'
    // compilers (Tint) reject `bitcast<f32>(0x7fc00000u)` folded as one.
    var bits = 0x7fc00000u;
    return bitcast<f32>(bits);
}

fn neg_inf_f32() -> f32 {
    // Through a variable, as nan_f32: Tint rejects -inf folded in a constant expression.
    var bits = 0xff800000u;
    return bitcast<f32>(bits);
}

// IEEE binary16 bits -> f32 (exact; subnormals included).
fn f16_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    if (e == 0u) {
        // zero or subnormal: m * 2^-24
        let v = f32(m) * 5.9604644775390625e-8;
        return bitcast<f32>(bitcast<u32>(v) | sign);
    }
    if (e == 31u) {
        return bitcast<f32>(sign | 0x7f800000u | (m << 13u));
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (m << 13u));
}

// f32 -> binary16 bits, round to nearest even; a transcription of the `half` crate's
// software conversion (f32_to_f16_fallback), so results match the CPU bit for bit.
fn f32_to_f16(value: f32) -> u32 {
    let x = bitcast<u32>(value);
    let sign = x & 0x80000000u;
    let ex = x & 0x7f800000u;
    let man = x & 0x007fffffu;
    if (ex == 0x7f800000u) {
        let nan_bit = select(0u, 0x0200u, man != 0u);
        return (sign >> 16u) | 0x7c00u | nan_bit | (man >> 13u);
    }
    let half_sign = sign >> 16u;
    let half_exp = i32(ex >> 23u) - 127 + 15;
    if (half_exp >= 31) {
        return half_sign | 0x7c00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return half_sign;
        }
        let m = man | 0x00800000u;
        var half_man = m >> u32(14 - half_exp);
        let round_bit = 1u << u32(13 - half_exp);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            half_man += 1u;
        }
        return half_sign | half_man;
    }
    let bits = half_sign | (u32(half_exp) << 10u) | (man >> 13u);
    let round_bit = 0x00001000u;
    if ((man & round_bit) != 0u && (man & (3u * round_bit - 1u)) != 0u) {
        return bits + 1u;
    }
    return bits;
}

fn bf16_to_f32(h: u32) -> f32 {
    return bitcast<f32>(h << 16u);
}

// f32 -> bfloat16 bits, round to nearest even, NaN kept quiet (as `half::bf16::from_f32`).
fn f32_to_bf16(value: f32) -> u32 {
    let x = bitcast<u32>(value);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return (x >> 16u) | 0x0040u;
    }
    let round_bit = 0x00008000u;
    if ((x & round_bit) != 0u && (x & (3u * round_bit - 1u)) != 0u) {
        return (x >> 16u) + 1u;
    }
    return x >> 16u;
}

// (sin x, cos x) to about one ulp for |x| up to ~1e5, the same on every device (the
// built-ins may be far less accurate for large arguments). Cody-Waite reduction by pi/2
// with a three-part constant, then the Cephes single-precision polynomials on
// [-pi/4, pi/4] (Moshier, Cephes Math Library, sinf.c).
fn sin_cos(x: f32) -> vec2<f32> {
    let j = round(x * 0.636619772367581343);
    let r = ((x - j * 1.5703125) - j * 4.837512969970703125e-4) - j * 7.54978995489188216e-8;
    let z = r * r;
    let s = r + r * z * (-1.6666654611e-1 + z * (8.3321608736e-3 + z * -1.9515295891e-4));
    let c = 1.0 - 0.5 * z + z * z * (4.166664568298827e-2 + z * (-1.388731625493765e-3 + z * 2.443315711809948e-5));
    let q = u32(i32(j) & 3);
    if (q == 0u) {
        return vec2<f32>(s, c);
    }
    if (q == 1u) {
        return vec2<f32>(c, -s);
    }
    if (q == 2u) {
        return vec2<f32>(-s, -c);
    }
    return vec2<f32>(-c, s);
}
