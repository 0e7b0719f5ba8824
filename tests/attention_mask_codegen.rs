//! Mask expressions as WGSL and CUDA source: the WGSL text validates with naga inside a
//! function, and both texts, evaluated by an interpreter written here for their C-like
//! syntax, agree with `MaskExpr::eval` on random expressions and edge-case integers.

mod common;
use ferrotune::ops::mask_codegen::{VarNames, CUDA_PRELUDE};
use ferrotune::ops::MaskExpr;
use rand::{RngExt, SeedableRng};

fn validate_wgsl(expr: &str) -> Result<(), String> {
    let src = format!(
        "fn flex_mask(q_idx: i32, kv_idx: i32, seg: i32) -> bool {{\n    return {expr};\n}}\n\
         @compute @workgroup_size(1)\nfn main() {{\n    _ = flex_mask(1i, 2i, 3i);\n}}\n"
    );
    let module = naga::front::wgsl::parse_str(&src).map_err(|e| e.emit_to_string(&src))?;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::empty())
        .validate(&module)
        .map_err(|e| format!("{e:?}\n{src}"))?;
    Ok(())
}

// ---- an interpreter for the generated text ---------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum V {
    I(i32),
    B(bool),
}

struct Eval<'a> {
    toks: Vec<String>,
    pos: usize,
    vars: [(&'a str, i32); 3],
    cuda: bool,
}

fn tokenize(s: &str) -> Vec<String> {
    let c: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_whitespace() {
            i += 1;
        } else if c[i].is_ascii_alphanumeric() || c[i] == '_' {
            let st = i;
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(c[st..i].iter().collect());
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            let n = if ["&&", "||", "==", "!=", "<=", ">="].contains(&two.as_str()) {
                2
            } else {
                1
            };
            out.push(c[i..i + n].iter().collect());
            i += n;
        }
    }
    out
}

fn wgsl_div(a: i32, b: i32) -> i32 {
    // WGSL: "If e2 is zero, or e1 is the most negative value and e2 is -1, the result is e1."
    if b == 0 || (a == i32::MIN && b == -1) {
        a
    } else {
        a / b
    }
}

fn wgsl_rem(a: i32, b: i32) -> i32 {
    // WGSL: "If e2 is zero, or e1 is the most negative value and e2 is -1, the result is 0."
    if b == 0 || (a == i32::MIN && b == -1) {
        0
    } else {
        a % b
    }
}

impl Eval<'_> {
    fn next(&mut self) -> String {
        self.pos += 1;
        self.toks[self.pos - 1].clone()
    }
    fn peek(&self) -> Option<&str> {
        self.toks.get(self.pos).map(|s| s.as_str())
    }
    fn binary(&mut self, min_prec: u8) -> V {
        let mut lhs = self.atom();
        loop {
            let Some(op) = self.peek().map(str::to_string) else {
                return lhs;
            };
            let prec = match op.as_str() {
                "||" => 1,
                "&&" => 2,
                "==" | "!=" => 3,
                "<" | "<=" | ">" | ">=" => 4,
                "+" | "-" => 5,
                "*" | "/" | "%" => 6,
                _ => return lhs,
            };
            if prec < min_prec {
                return lhs;
            }
            self.next();
            let rhs = self.binary(prec + 1);
            lhs = match (lhs, rhs) {
                (V::B(a), V::B(b)) => V::B(match op.as_str() {
                    "||" => a || b,
                    "&&" => a && b,
                    "==" => a == b,
                    "!=" => a != b,
                    o => panic!("{o} on booleans"),
                }),
                (V::I(a), V::I(b)) => {
                    assert!(
                        !(self.cuda && ["+", "-", "*", "/", "%"].contains(&op.as_str())),
                        "raw integer `{op}` in CUDA text (overflow and division must go through helpers)"
                    );
                    match op.as_str() {
                        "+" => V::I(a.wrapping_add(b)),
                        "-" => V::I(a.wrapping_sub(b)),
                        "*" => V::I(a.wrapping_mul(b)),
                        "/" => V::I(wgsl_div(a, b)),
                        "%" => V::I(wgsl_rem(a, b)),
                        "==" => V::B(a == b),
                        "!=" => V::B(a != b),
                        "<" => V::B(a < b),
                        "<=" => V::B(a <= b),
                        ">" => V::B(a > b),
                        ">=" => V::B(a >= b),
                        o => panic!("{o} on integers"),
                    }
                }
                (a, b) => panic!("mixed operands {a:?} {op} {b:?}"),
            };
        }
    }
    fn int(&mut self) -> i32 {
        match self.binary(1) {
            V::I(x) => x,
            v => panic!("expected an integer, got {v:?}"),
        }
    }
    fn atom(&mut self) -> V {
        let t = self.next();
        match t.as_str() {
            "(" => {
                let v = self.binary(1);
                assert_eq!(self.next(), ")");
                v
            }
            "!" => match self.atom() {
                V::B(b) => V::B(!b),
                v => panic!("! on {v:?}"),
            },
            "-" => match self.atom() {
                V::I(x) => V::I(x.wrapping_neg()),
                v => panic!("- on {v:?}"),
            },
            "true" => V::B(true),
            "false" => V::B(false),
            f if f.starts_with("ft_") => {
                assert!(self.cuda, "helper call in WGSL text");
                assert_eq!(self.next(), "(");
                let a = self.int();
                if f == "ft_neg" {
                    assert_eq!(self.next(), ")");
                    return V::I(a.wrapping_neg());
                }
                assert_eq!(self.next(), ",");
                let b = self.int();
                assert_eq!(self.next(), ")");
                // The prelude's definitions: two's-complement wrap, WGSL's division rules.
                V::I(match f {
                    "ft_add" => a.wrapping_add(b),
                    "ft_sub" => a.wrapping_sub(b),
                    "ft_mul" => a.wrapping_mul(b),
                    "ft_div" => wgsl_div(a, b),
                    "ft_rem" => wgsl_rem(a, b),
                    _ => panic!("unknown helper {f}"),
                })
            }
            lit if lit.as_bytes()[0].is_ascii_digit() => {
                let digits = if self.cuda {
                    lit
                } else {
                    lit.strip_suffix('i').expect("WGSL integer literals carry the i suffix")
                };
                V::I(digits.parse::<i64>().unwrap() as i32)
            }
            name => V::I(
                self.vars
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("unknown name {name}"))
                    .1,
            ),
        }
    }
}

fn eval_text(text: &str, names: VarNames, v: [i32; 3], cuda: bool) -> bool {
    let mut e = Eval {
        toks: tokenize(text),
        pos: 0,
        vars: [(names.q_idx, v[0]), (names.kv_idx, v[1]), (names.seg, v[2])],
        cuda,
    };
    let r = e.binary(1);
    assert_eq!(e.pos, e.toks.len(), "trailing tokens in {text}");
    match r {
        V::B(b) => b,
        v => panic!("{text} is not boolean: {v:?}"),
    }
}

// ---- random expressions ----------------------------------------------------------------

fn int_expr(r: &mut rand_chacha::ChaCha8Rng, depth: u32) -> String {
    if depth == 0 || r.random_range(0..3) == 0 {
        return match r.random_range(0..6) {
            0 => "q_idx".into(),
            1 => "kv_idx".into(),
            2 => "seg".into(),
            3 => ["0", "1", "2", "7", "2147483647"][r.random_range(0..5)].into(),
            4 => format!("-{}", r.random_range(0..5)),
            _ => "-2147483648".into(),
        };
    }
    match r.random_range(0..7) {
        0 => format!("-({})", int_expr(r, depth - 1)),
        k => {
            let op = ["+", "-", "*", "/", "%", "+"][k - 1];
            // A constant zero divisor is rejected at parse time; keep divisors variable.
            let rhs = if op == "/" || op == "%" {
                format!("({} + kv_idx)", int_expr(r, depth - 1))
            } else {
                int_expr(r, depth - 1)
            };
            format!("{} {op} {rhs}", int_expr(r, depth - 1))
        }
    }
}

fn bool_expr(r: &mut rand_chacha::ChaCha8Rng, depth: u32) -> String {
    if depth == 0 || r.random_range(0..3) == 0 {
        let op = ["<", "<=", ">", ">=", "==", "!="][r.random_range(0..6)];
        return format!("{} {op} {}", int_expr(r, 2), int_expr(r, 2));
    }
    match r.random_range(0..4) {
        0 => format!("!({})", bool_expr(r, depth - 1)),
        1 => format!("({}) == ({})", bool_expr(r, depth - 1), bool_expr(r, depth - 1)),
        2 => format!("{} && {}", bool_expr(r, depth - 1), bool_expr(r, depth - 1)),
        _ => format!("{} || {}", bool_expr(r, depth - 1), bool_expr(r, depth - 1)),
    }
}

const EDGES: [i32; 9] = [0, 1, -1, 2, 7, 255, -256, i32::MAX, i32::MIN];

#[test]
fn generated_source_agrees_with_the_cpu_on_random_expressions() {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let names = VarNames {
        q_idx: "qi",
        kv_idx: "kj",
        seg: "sid",
    };
    let mut checked = 0;
    for _ in 0..300 {
        let src = bool_expr(&mut r, 3);
        let m = MaskExpr::parse(&src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let (w, c) = (m.to_wgsl(names), m.to_cuda(names));
        for _ in 0..40 {
            let v = [
                EDGES[r.random_range(0..EDGES.len())],
                r.random_range(-40..4000),
                EDGES[r.random_range(0..EDGES.len())],
            ];
            let want = m.eval(v[0], v[1], v[2]);
            assert_eq!(eval_text(&w, names, v, false), want, "WGSL {w} at {v:?} (from {src})");
            assert_eq!(eval_text(&c, names, v, true), want, "CUDA {c} at {v:?} (from {src})");
            checked += 1;
        }
    }
    assert_eq!(checked, 12_000);
}

#[test]
fn wgsl_validates_with_naga() {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(9);
    let mut exprs: Vec<String> = vec![
        "q_idx >= kv_idx && q_idx - kv_idx < 256".into(),
        "kv_idx < 4 || (q_idx >= kv_idx && seg % 2 == 1)".into(),
        "-2147483648 < q_idx / (kv_idx + 1) && true".into(),
        "!(q_idx < kv_idx)".into(),
    ];
    exprs.extend((0..60).map(|_| bool_expr(&mut r, 3)));
    for src in exprs {
        let w = MaskExpr::parse(&src).unwrap().to_wgsl(VarNames::default());
        validate_wgsl(&w).unwrap_or_else(|e| panic!("{src} -> {w}:\n{e}"));
    }
    // The wrapper itself rejects a wrong expression, so the check can fail.
    assert!(validate_wgsl("q_idx + 1i").is_err());
    assert!(validate_wgsl("q_idx < 1u").is_err());
}

#[test]
fn cuda_text_has_the_expected_shape() {
    let m = MaskExpr::parse("q_idx >= kv_idx && (q_idx - kv_idx) / 2 < 128 || !(seg == 3)").unwrap();
    let c = m.to_cuda(VarNames::default());
    assert_eq!(
        c,
        "(((q_idx >= kv_idx) && (ft_div(ft_sub(q_idx, kv_idx), 2) < 128)) || (!(seg == 3)))"
    );
    // Balanced parentheses, and every helper it calls is defined in the prelude.
    let depth = c.chars().try_fold(0i32, |d, ch| {
        let d = d + (ch == '(') as i32 - (ch == ')') as i32;
        (d >= 0).then_some(d)
    });
    assert_eq!(depth, Some(0));
    for f in ["ft_add", "ft_sub", "ft_mul", "ft_neg", "ft_div", "ft_rem"] {
        assert!(CUDA_PRELUDE.contains(&format!("int {f}(")), "{f}");
    }
}
