//! A mask expression as shader source: a WGSL expression and a CUDA C++ expression, both
//! fully parenthesised and reading three `i32`/`int` variables named by the caller. Both
//! compute exactly what [`MaskExpr::eval`] computes: WGSL's integer rules are the
//! language's rules, and the CUDA text calls the helpers of [`CUDA_PRELUDE`], which give
//! C++'s undefined cases (overflow, division by zero, `INT_MIN / -1`) the same answers.

use super::mask_expr::{BinOp, Expr, MaskExpr, UnOp, Var};

/// Device functions the CUDA expression calls; put them once before the kernel.
pub const CUDA_PRELUDE: &str = r#"
__device__ __forceinline__ int ft_add(int a, int b) { return (int)((unsigned)a + (unsigned)b); }
__device__ __forceinline__ int ft_sub(int a, int b) { return (int)((unsigned)a - (unsigned)b); }
__device__ __forceinline__ int ft_mul(int a, int b) { return (int)((unsigned)a * (unsigned)b); }
__device__ __forceinline__ int ft_neg(int a) { return (int)(0u - (unsigned)a); }
__device__ __forceinline__ int ft_div(int a, int b) { return (b == 0 || (a == (-2147483647 - 1) && b == -1)) ? a : a / b; }
__device__ __forceinline__ int ft_rem(int a, int b) { return (b == 0 || (a == (-2147483647 - 1) && b == -1)) ? 0 : a % b; }
"#;

/// Names of the three variables in the generated code.
#[derive(Clone, Copy, Debug)]
pub struct VarNames<'a> {
    pub q_idx: &'a str,
    pub kv_idx: &'a str,
    pub seg: &'a str,
}

impl Default for VarNames<'_> {
    fn default() -> Self {
        VarNames {
            q_idx: "q_idx",
            kv_idx: "kv_idx",
            seg: "seg",
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Lang {
    Wgsl,
    Cuda,
}

impl MaskExpr {
    /// The mask as a WGSL `bool` expression over `i32` variables.
    pub fn to_wgsl(&self, names: VarNames) -> String {
        emit(&self.root, names, Lang::Wgsl)
    }

    /// The mask as a CUDA C++ `bool` expression over `int` variables (needs [`CUDA_PRELUDE`]).
    pub fn to_cuda(&self, names: VarNames) -> String {
        emit(&self.root, names, Lang::Cuda)
    }
}

fn int_literal(v: i32, lang: Lang) -> String {
    let suffix = if lang == Lang::Wgsl { "i" } else { "" };
    if v == i32::MIN {
        match lang {
            Lang::Wgsl => "(-2147483647i - 1i)".into(),
            Lang::Cuda => "ft_sub(-2147483647, 1)".into(),
        }
    } else if v < 0 {
        format!("(-{}{suffix})", -v)
    } else {
        format!("{v}{suffix}")
    }
}

fn emit(e: &Expr, n: VarNames, lang: Lang) -> String {
    match e {
        Expr::Int(v) => int_literal(*v, lang),
        Expr::Bool(b) => b.to_string(),
        Expr::Var(Var::QIdx) => n.q_idx.to_string(),
        Expr::Var(Var::KvIdx) => n.kv_idx.to_string(),
        Expr::Var(Var::Seg) => n.seg.to_string(),
        Expr::Unary(UnOp::Not, x) => format!("(!{})", emit(x, n, lang)),
        Expr::Unary(UnOp::Neg, x) => match lang {
            Lang::Wgsl => format!("(-{})", emit(x, n, lang)),
            Lang::Cuda => format!("ft_neg({})", emit(x, n, lang)),
        },
        Expr::Binary(op, a, b) => {
            let (a, b) = (emit(a, n, lang), emit(b, n, lang));
            let helper = match op {
                BinOp::Add => "ft_add",
                BinOp::Sub => "ft_sub",
                BinOp::Mul => "ft_mul",
                BinOp::Div => "ft_div",
                BinOp::Rem => "ft_rem",
                _ => "",
            };
            if lang == Lang::Cuda && !helper.is_empty() {
                format!("{helper}({a}, {b})")
            } else {
                format!("({a} {} {b})", op.symbol())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emits_parenthesised_source() {
        let m = MaskExpr::parse("q_idx >= kv_idx && q_idx - kv_idx < 256 || !(seg == -3)").unwrap();
        assert_eq!(
            m.to_wgsl(VarNames::default()),
            "(((q_idx >= kv_idx) && ((q_idx - kv_idx) < 256i)) || (!(seg == (-3i))))"
        );
        let names = VarNames {
            q_idx: "qi",
            kv_idx: "kj",
            seg: "s",
        };
        assert_eq!(
            m.to_cuda(names),
            "(((qi >= kj) && (ft_sub(qi, kj) < 256)) || (!(s == (-3))))"
        );
    }
}
