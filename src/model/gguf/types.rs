//! ggml tensor types: ids, names and block layouts as listed in ggml.h / ggml.c
//! (`type_traits`: elements per block and bytes per block).

/// A ggml tensor type known to the reader. Knowing a type lets us lay out the file;
/// only the types in [`GgmlType::DEQUANTIZABLE`] can be turned into floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block.
    pub block_size: usize,
    /// Bytes per block.
    pub type_size: usize,
}

const fn t(id: u32, name: &'static str, block_size: usize, type_size: usize) -> GgmlType {
    GgmlType {
        id,
        name,
        block_size,
        type_size,
    }
}

pub const F32: GgmlType = t(0, "F32", 1, 4);
pub const F16: GgmlType = t(1, "F16", 1, 2);
pub const Q4_0: GgmlType = t(2, "Q4_0", 32, 18);
pub const Q4_1: GgmlType = t(3, "Q4_1", 32, 20);
pub const Q5_0: GgmlType = t(6, "Q5_0", 32, 22);
pub const Q5_1: GgmlType = t(7, "Q5_1", 32, 24);
pub const Q8_0: GgmlType = t(8, "Q8_0", 32, 34);
pub const BF16: GgmlType = t(30, "BF16", 1, 2);

const KNOWN: &[GgmlType] = &[
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    t(9, "Q8_1", 32, 40),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    BF16,
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
    t(40, "NVFP4", 64, 36),
    t(41, "Q1_0", 128, 18),
];

impl GgmlType {
    /// Types that [`super::dequant`] turns into f32.
    pub const DEQUANTIZABLE: [GgmlType; 8] = [F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1];

    pub fn from_id(id: u32) -> Option<GgmlType> {
        KNOWN.iter().copied().find(|k| k.id == id)
    }

    pub fn from_name(name: &str) -> Option<GgmlType> {
        KNOWN.iter().copied().find(|k| k.name.eq_ignore_ascii_case(name))
    }

    pub fn is_dequantizable(self) -> bool {
        Self::DEQUANTIZABLE.contains(&self)
    }

    /// "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1", for error messages.
    pub fn dequantizable_list() -> String {
        Self::DEQUANTIZABLE
            .iter()
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Bytes taken by `n` elements (`n` must be a multiple of the block size).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size) {
            return None;
        }
        (n / self.block_size).checked_mul(self.type_size)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}
