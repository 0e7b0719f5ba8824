//! The attention-mask expression language of `flex_attention_mask`: a boolean expression
//! over three integers, `q_idx` and `kv_idx` (positions of the query and the key inside
//! their document) and `seg` (the document's segment id), e.g.
//! `q_idx >= kv_idx && q_idx - kv_idx < 256`.
//!
//! Grammar (C precedence, loosest first): `||`, `&&`, `== !=`, `< <= > >=`, `+ -`,
//! `* / %`, unary `! -`, then literals, names and parentheses. Values are 32-bit signed
//! integers or booleans and the types are checked: `&&` takes comparisons, `+` takes
//! integers. Arithmetic follows WGSL's integer rules on every backend: `+ - *` wrap,
//! `/` and `%` truncate toward zero, `x / 0 = x`, `x % 0 = 0`, `i32::MIN / -1 = i32::MIN`
//! and `i32::MIN % -1 = 0` (WGSL spec, "Arithmetic Expressions"). Constant sub-expressions
//! are folded while parsing, and a constant zero divisor is an error.

use std::fmt;

/// The names an expression may read.
pub const VARIABLES: [&str; 3] = ["q_idx", "kv_idx", "seg"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Var {
    QIdx,
    KvIdx,
    Seg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnOp {
    Not,
    Neg,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Or,
    And,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Or => "||",
            BinOp::And => "&&",
            BinOp::Eq => "==",
            BinOp::Ne => "!=",
            BinOp::Lt => "<",
            BinOp::Le => "<=",
            BinOp::Gt => ">",
            BinOp::Ge => ">=",
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
            BinOp::Rem => "%",
        }
    }
}

/// A type-checked expression tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    Int(i32),
    Bool(bool),
    Var(Var),
    Unary(UnOp, Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ty {
    Int,
    Bool,
}

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Int => "an integer",
            Ty::Bool => "a boolean (a comparison)",
        }
    }
}

/// A parsed mask: the source text and its tree (boolean-typed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskExpr {
    pub source: String,
    pub root: Expr,
}

/// Why a mask expression does not parse: the 1-based column and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MaskError {
    pub source: String,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for MaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let caret = " ".repeat(self.column.saturating_sub(1));
        write!(
            f,
            "column {}: {}\n    {}\n    {caret}^",
            self.column, self.message, self.source
        )
    }
}

impl std::error::Error for MaskError {}

// ---- integer semantics (shared by evaluation and constant folding) ------------------

/// `a / b` with WGSL's rules for the cases C leaves undefined.
pub fn div(a: i32, b: i32) -> i32 {
    if b == 0 || (a == i32::MIN && b == -1) {
        a
    } else {
        a / b
    }
}

/// `a % b` with WGSL's rules for the cases C leaves undefined.
pub fn rem(a: i32, b: i32) -> i32 {
    if b == 0 || (a == i32::MIN && b == -1) {
        0
    } else {
        a % b
    }
}

fn int_op(op: BinOp, a: i32, b: i32) -> i32 {
    match op {
        BinOp::Add => a.wrapping_add(b),
        BinOp::Sub => a.wrapping_sub(b),
        BinOp::Mul => a.wrapping_mul(b),
        BinOp::Div => div(a, b),
        BinOp::Rem => rem(a, b),
        _ => unreachable!("not an integer operator"),
    }
}

fn cmp_op(op: BinOp, a: i32, b: i32) -> bool {
    match op {
        BinOp::Eq => a == b,
        BinOp::Ne => a != b,
        BinOp::Lt => a < b,
        BinOp::Le => a <= b,
        BinOp::Gt => a > b,
        BinOp::Ge => a >= b,
        _ => unreachable!("not a comparison"),
    }
}

impl Expr {
    fn int(&self, v: [i32; 3]) -> i32 {
        match self {
            Expr::Int(x) => *x,
            Expr::Var(var) => v[*var as usize],
            Expr::Unary(UnOp::Neg, x) => x.int(v).wrapping_neg(),
            Expr::Binary(op, a, b) => int_op(*op, a.int(v), b.int(v)),
            Expr::Bool(_) | Expr::Unary(UnOp::Not, _) => unreachable!("type-checked"),
        }
    }

    fn bool(&self, v: [i32; 3]) -> bool {
        match self {
            Expr::Bool(b) => *b,
            Expr::Unary(UnOp::Not, x) => !x.bool(v),
            Expr::Binary(BinOp::Or, a, b) => a.bool(v) || b.bool(v),
            Expr::Binary(BinOp::And, a, b) => a.bool(v) && b.bool(v),
            Expr::Binary(op @ (BinOp::Eq | BinOp::Ne), a, b) if a.is_bool() => {
                (a.bool(v) == b.bool(v)) == (*op == BinOp::Eq)
            }
            Expr::Binary(op, a, b) => cmp_op(*op, a.int(v), b.int(v)),
            Expr::Int(_) | Expr::Var(_) | Expr::Unary(UnOp::Neg, _) => unreachable!("type-checked"),
        }
    }

    /// The type of a checked tree.
    pub fn is_bool(&self) -> bool {
        match self {
            Expr::Bool(_) | Expr::Unary(UnOp::Not, _) => true,
            Expr::Binary(op, ..) => !matches!(op, BinOp::Add | BinOp::Sub | BinOp::Mul | BinOp::Div | BinOp::Rem),
            Expr::Int(_) | Expr::Var(_) | Expr::Unary(UnOp::Neg, _) => false,
        }
    }
}

impl MaskExpr {
    pub fn parse(source: &str) -> Result<MaskExpr, MaskError> {
        let tokens = lex(source)?;
        let mut p = Parser {
            src: source,
            tokens,
            pos: 0,
        };
        let root = p.expr()?;
        if let Some(t) = p.peek() {
            return Err(p.err(
                t.col,
                format!("expected an operator or the end, found {}", t.kind.show()),
            ));
        }
        if root.ty != Ty::Bool {
            return Err(p.err(
                1,
                "the mask must be a condition (a comparison such as `q_idx >= kv_idx`), found an integer expression"
                    .into(),
            ));
        }
        Ok(MaskExpr {
            source: source.to_string(),
            root: root.expr,
        })
    }

    /// Whether the query at document position `q_idx` sees the key at `kv_idx`.
    pub fn eval(&self, q_idx: i32, kv_idx: i32, seg: i32) -> bool {
        self.root.bool([q_idx, kv_idx, seg])
    }
}

// ---- lexer ---------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Int(i64),
    Name(String),
    Op(&'static str),
    LParen,
    RParen,
}

impl Kind {
    fn show(&self) -> String {
        match self {
            Kind::Int(i) => format!("the number {i}"),
            Kind::Name(n) => format!("`{n}`"),
            Kind::Op(o) => format!("`{o}`"),
            Kind::LParen => "`(`".into(),
            Kind::RParen => "`)`".into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    kind: Kind,
    /// 1-based column of the first character.
    col: usize,
}

const OPS: [&str; 15] = [
    "&&", "||", "==", "!=", "<=", ">=", "<", ">", "!", "+", "-", "*", "/", "%", "=",
];

fn lex(src: &str) -> Result<Vec<Token>, MaskError> {
    let err = |col: usize, message: String| MaskError {
        source: src.to_string(),
        column: col,
        message,
    };
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let col = i + 1;
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_alphanumeric() {
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            let v: i64 = text
                .parse()
                .map_err(|_| err(col, format!("`{text}` is not a decimal integer")))?;
            if v > i32::MAX as i64 + 1 {
                return Err(err(col, format!("{text} does not fit in a 32-bit integer")));
            }
            out.push(Token {
                kind: Kind::Int(v),
                col,
            });
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token {
                kind: Kind::Name(chars[start..i].iter().collect()),
                col,
            });
        } else if c == '(' || c == ')' {
            let kind = if c == '(' { Kind::LParen } else { Kind::RParen };
            out.push(Token { kind, col });
            i += 1;
        } else {
            let rest: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let Some(op) = OPS.iter().find(|o| rest.starts_with(**o)) else {
                let hint = match c {
                    '&' => "; write `&&`",
                    '|' => "; write `||`",
                    _ => "",
                };
                return Err(err(col, format!("unexpected character `{c}`{hint}")));
            };
            if *op == "=" {
                return Err(err(col, "`=` is not an operator; write `==` to compare".into()));
            }
            out.push(Token {
                kind: Kind::Op(op),
                col,
            });
            i += op.chars().count();
        }
    }
    Ok(out)
}

// ---- parser (precedence climbing with type checks) ------------------------------------

struct Node {
    expr: Expr,
    ty: Ty,
    col: usize,
}

struct Parser<'a> {
    src: &'a str,
    tokens: Vec<Token>,
    pos: usize,
}

/// Binary operator levels, loosest first.
const LEVELS: [&[(&str, BinOp)]; 6] = [
    &[("||", BinOp::Or)],
    &[("&&", BinOp::And)],
    &[("==", BinOp::Eq), ("!=", BinOp::Ne)],
    &[("<", BinOp::Lt), ("<=", BinOp::Le), (">", BinOp::Gt), (">=", BinOp::Ge)],
    &[("+", BinOp::Add), ("-", BinOp::Sub)],
    &[("*", BinOp::Mul), ("/", BinOp::Div), ("%", BinOp::Rem)],
];

impl Parser<'_> {
    fn err(&self, column: usize, message: String) -> MaskError {
        MaskError {
            source: self.src.to_string(),
            column,
            message,
        }
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos)
    }

    fn end_col(&self) -> usize {
        self.src.chars().count() + 1
    }

    fn expr(&mut self) -> Result<Node, MaskError> {
        self.level(0)
    }

    fn level(&mut self, l: usize) -> Result<Node, MaskError> {
        if l == LEVELS.len() {
            return self.unary();
        }
        let mut lhs = self.level(l + 1)?;
        loop {
            let Some((op, col)) = self.peek().and_then(|t| match &t.kind {
                Kind::Op(o) => LEVELS[l].iter().find(|(s, _)| s == o).map(|(_, b)| (*b, t.col)),
                _ => None,
            }) else {
                return Ok(lhs);
            };
            self.pos += 1;
            let rhs = self.level(l + 1)?;
            lhs = self.binary(op, col, lhs, rhs)?;
        }
    }

    fn binary(&self, op: BinOp, col: usize, a: Node, b: Node) -> Result<Node, MaskError> {
        let sym = op.symbol();
        let (want, ty) = match op {
            BinOp::Or | BinOp::And => (Some(Ty::Bool), Ty::Bool),
            BinOp::Eq | BinOp::Ne => (None, Ty::Bool),
            BinOp::Lt | BinOp::Le | BinOp::Gt | BinOp::Ge => (Some(Ty::Int), Ty::Bool),
            _ => (Some(Ty::Int), Ty::Int),
        };
        for side in [&a, &b] {
            if let Some(w) = want {
                if side.ty != w {
                    return Err(self.err(
                        side.col,
                        format!("`{sym}` needs {} on both sides, found {}", w.name(), side.ty.name()),
                    ));
                }
            }
        }
        if want.is_none() && a.ty != b.ty {
            return Err(self.err(b.col, format!("`{sym}` compares {} with {}", a.ty.name(), b.ty.name())));
        }
        if matches!(op, BinOp::Div | BinOp::Rem) && b.expr == Expr::Int(0) {
            return Err(self.err(col, format!("`{sym}` by zero")));
        }
        let expr = match (&a.expr, &b.expr) {
            (Expr::Int(x), Expr::Int(y)) if ty == Ty::Int => Expr::Int(int_op(op, *x, *y)),
            (Expr::Int(x), Expr::Int(y)) => Expr::Bool(cmp_op(op, *x, *y)),
            (Expr::Bool(x), Expr::Bool(y)) => Expr::Bool(match op {
                BinOp::Or => *x || *y,
                BinOp::And => *x && *y,
                BinOp::Eq => x == y,
                _ => x != y,
            }),
            _ => Expr::Binary(op, Box::new(a.expr), Box::new(b.expr)),
        };
        Ok(Node { expr, ty, col: a.col })
    }

    fn unary(&mut self) -> Result<Node, MaskError> {
        let Some(t) = self.peek().cloned() else {
            return Err(self.err(
                self.end_col(),
                "the expression ends early; expected a number, `q_idx`, `kv_idx`, `seg` or `(`".into(),
            ));
        };
        self.pos += 1;
        match t.kind {
            Kind::Op("!") | Kind::Op("-") => {
                let not = t.kind == Kind::Op("!");
                // `-2147483648` is the one literal that only exists negated.
                if !not {
                    if let Some(Token { kind: Kind::Int(v), .. }) = self.peek().cloned() {
                        self.pos += 1;
                        return Ok(Node {
                            expr: Expr::Int((-v) as i32),
                            ty: Ty::Int,
                            col: t.col,
                        });
                    }
                }
                let x = self.unary()?;
                let want = if not { Ty::Bool } else { Ty::Int };
                if x.ty != want {
                    let sym = if not { "!" } else { "-" };
                    return Err(self.err(x.col, format!("`{sym}` needs {}, found {}", want.name(), x.ty.name())));
                }
                let expr = match x.expr {
                    Expr::Bool(b) => Expr::Bool(!b),
                    Expr::Int(i) => Expr::Int(i.wrapping_neg()),
                    e => Expr::Unary(if not { UnOp::Not } else { UnOp::Neg }, Box::new(e)),
                };
                Ok(Node {
                    expr,
                    ty: want,
                    col: t.col,
                })
            }
            Kind::Int(v) => {
                if v > i32::MAX as i64 {
                    return Err(self.err(t.col, format!("{v} does not fit in a 32-bit integer")));
                }
                Ok(Node {
                    expr: Expr::Int(v as i32),
                    ty: Ty::Int,
                    col: t.col,
                })
            }
            Kind::Name(n) => {
                if let Some(Token { kind: Kind::LParen, .. }) = self.peek() {
                    return Err(self.err(
                        t.col,
                        format!("`{n}(...)`: function calls are not part of the mask language"),
                    ));
                }
                let (expr, ty) = match n.as_str() {
                    "q_idx" => (Expr::Var(Var::QIdx), Ty::Int),
                    "kv_idx" => (Expr::Var(Var::KvIdx), Ty::Int),
                    "seg" => (Expr::Var(Var::Seg), Ty::Int),
                    "true" => (Expr::Bool(true), Ty::Bool),
                    "false" => (Expr::Bool(false), Ty::Bool),
                    _ => {
                        return Err(self.err(
                            t.col,
                            format!("unknown name `{n}`; the mask can read q_idx, kv_idx and seg"),
                        ))
                    }
                };
                Ok(Node { expr, ty, col: t.col })
            }
            Kind::LParen => {
                let inner = self.expr()?;
                match self.peek() {
                    Some(Token { kind: Kind::RParen, .. }) => {
                        self.pos += 1;
                        Ok(Node { col: t.col, ..inner })
                    }
                    Some(other) => Err(self.err(
                        other.col,
                        format!(
                            "expected `)` to close the `(` at column {}, found {}",
                            t.col,
                            other.kind.show()
                        ),
                    )),
                    None => Err(self.err(
                        self.end_col(),
                        format!("expected `)` to close the `(` at column {}", t.col),
                    )),
                }
            }
            other => Err(self.err(
                t.col,
                format!(
                    "expected a number, `q_idx`, `kv_idx`, `seg` or `(`, found {}",
                    other.show()
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> MaskError {
        MaskExpr::parse(s).unwrap_err()
    }

    #[test]
    fn evaluates_with_c_precedence() {
        let m = MaskExpr::parse("q_idx >= kv_idx && q_idx - kv_idx < 3 || seg == 7").unwrap();
        assert!(m.eval(5, 3, 1));
        assert!(!m.eval(5, 2, 1));
        assert!(!m.eval(2, 3, 1));
        assert!(m.eval(2, 3, 7));
        let m = MaskExpr::parse("!(q_idx % 2 == 1) && -kv_idx * 2 + 10 > 0").unwrap();
        assert!(m.eval(4, 4, 0));
        assert!(!m.eval(3, 4, 0));
        assert!(!m.eval(4, 5, 0));
    }

    #[test]
    fn folds_constants_and_keeps_wgsl_integer_rules() {
        let m = MaskExpr::parse("q_idx < 2 * 3 + 1").unwrap();
        assert_eq!(
            m.root,
            Expr::Binary(BinOp::Lt, Box::new(Expr::Var(Var::QIdx)), Box::new(Expr::Int(7)))
        );
        assert_eq!(div(-7, 2), -3);
        assert_eq!(rem(-7, 2), -1);
        assert_eq!(div(5, 0), 5);
        assert_eq!(rem(5, 0), 0);
        assert_eq!(div(i32::MIN, -1), i32::MIN);
        let m = MaskExpr::parse("q_idx / kv_idx == q_idx").unwrap();
        assert!(m.eval(9, 0, 0));
        let m = MaskExpr::parse("-2147483648 < q_idx && 2147483647 + 1 == -2147483648").unwrap();
        assert!(m.eval(0, 0, 0));
    }

    #[test]
    fn errors_point_at_the_column() {
        let e = err("q_idx >= ");
        assert_eq!(e.column, 10);
        assert!(e.message.contains("ends early"), "{e}");
        let e = err("q_idx >= kv_idy");
        assert_eq!(
            (e.column, e.message.contains("unknown name `kv_idy`")),
            (10, true),
            "{e}"
        );
        let e = err("q_idx = kv_idx");
        assert_eq!(e.column, 7);
        assert!(e.message.contains("=="), "{e}");
        let e = err("q_idx >= kv_idx & seg == 1");
        assert_eq!(e.column, 17);
        assert!(e.message.contains("&&"), "{e}");
        let e = err("(q_idx >= kv_idx");
        assert_eq!(e.column, 17);
        assert!(e.message.contains("column 1"), "{e}");
        let e = err("abs(q_idx - kv_idx) < 4");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("function calls"), "{e}");
        let e = err("q_idx - kv_idx");
        assert!(e.message.contains("must be a condition"), "{e}");
        let e = err("q_idx && kv_idx < 3");
        assert_eq!(e.column, 1);
        assert!(e.message.contains("`&&` needs a boolean"), "{e}");
        let e = err("q_idx < kv_idx < 3");
        assert!(e.message.contains("`<` needs an integer"), "{e}");
        let e = err("q_idx % (3 - 3) == 0");
        assert_eq!(e.column, 7);
        assert!(e.message.contains("by zero"), "{e}");
        let e = err("q_idx < 4294967296");
        assert_eq!(e.column, 9);
        let e = err("q_idx < kv_idx)");
        assert_eq!(e.column, 15);
        assert!(e.message.contains("found `)`"), "{e}");
        let e = err("q_idx $ 2");
        assert_eq!(e.column, 7);
        // The rendering shows the source with a caret under the column.
        let shown = err("q_idx >= kv_idy").to_string();
        assert!(shown.ends_with("q_idx >= kv_idy\n             ^"), "{shown}");
    }
}
