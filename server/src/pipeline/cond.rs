//! `when:` conditions: a small expression language over values already computed and
//! request parameters, parsed and type-checked when the pipeline compiles, evaluated per
//! item before its node runs.
//!
//! ```text
//! expr    := and ('or' and)*
//! and     := unary ('and' unary)*
//! unary   := 'not' unary | compare
//! compare := operand (('=='|'!='|'<'|'<='|'>'|'>=') operand | 'in' '[' literal, ... ']')?
//! operand := number | 'string' | true | false | $param | node.output | len(node.output)
//! (parentheses group whole conditions: `(a.b > 0 or $c) and d.e == 1`)
//! ```
//!
//! A `node.output` operand is a tensor holding one value (a count, a class id, a
//! string); `len(x)` is the length of a list or the first dimension of a tensor.

use std::fmt;

/// How deep parentheses and `not`s may nest: the parser and the evaluator recurse on
/// them, and a file must not be able to exhaust a thread's stack.
pub const MAX_DEPTH: usize = 16;
/// The longest condition, in bytes.
pub const MAX_LEN: usize = 1024;

pub use crate::request::Scalar;

impl Scalar {
    pub fn kind(&self) -> Kind {
        match self {
            Scalar::Num(_) => Kind::Num,
            Scalar::Str(_) => Kind::Str,
            Scalar::Bool(_) => Kind::Bool,
        }
    }
}

/// The type of an operand, known when the pipeline compiles (`Unknown`: a tensor whose
/// dtype is only known at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Num,
    Str,
    Bool,
    Unknown,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Num => "a number",
            Kind::Str => "a string",
            Kind::Bool => "a boolean",
            Kind::Unknown => "a value",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Lit(Scalar),
    /// A request parameter, by its name.
    Param(String),
    /// `node.output` (or a pipeline input's name): the single value it holds.
    Ref(String),
    /// `len(node.output)`.
    Len(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A boolean operand on its own (`$debug`, `flags.on`).
    Is(Operand),
    Cmp(Operand, CmpOp, Operand),
    In(Operand, Vec<Scalar>),
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

impl Expr {
    /// Every `node.output` (or input name) the condition reads, `len()`'s included, in order.
    pub fn refs(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |o| {
            if let Operand::Ref(r) | Operand::Len(r) = o {
                if !out.contains(&r.as_str()) {
                    out.push(r.as_str());
                }
            }
        });
        out
    }

    /// Every parameter the condition reads.
    pub fn params(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.visit(&mut |o| {
            if let Operand::Param(p) = o {
                out.push(p.as_str());
            }
        });
        out
    }

    fn visit<'a>(&'a self, f: &mut impl FnMut(&'a Operand)) {
        match self {
            Expr::Is(o) | Expr::In(o, _) => f(o),
            Expr::Cmp(a, _, b) => {
                f(a);
                f(b);
            }
            Expr::Not(e) => e.visit(f),
            Expr::And(es) | Expr::Or(es) => es.iter().for_each(|e| e.visit(f)),
        }
    }

    /// Checks operand kinds: comparisons between like kinds, ordering on numbers only,
    /// `and`/`or`/`not` on booleans. `kind_of` gives each operand's kind or why it
    /// cannot be read.
    pub fn check(&self, kind_of: &dyn Fn(&Operand) -> Result<Kind, String>) -> Result<(), String> {
        match self {
            Expr::Is(o) => match kind_of(o)? {
                Kind::Bool | Kind::Unknown => Ok(()),
                k => Err(format!("{} is {k}, not a condition; compare it (e.g. `{} > 0`)", show(o), show(o))),
            },
            Expr::Cmp(a, op, b) => {
                let (ka, kb) = (kind_of(a)?, kind_of(b)?);
                if ka != Kind::Unknown && kb != Kind::Unknown && ka != kb {
                    return Err(format!("{} is {ka} but {} is {kb}: they cannot be compared", show(a), show(b)));
                }
                let ordered = !matches!(op, CmpOp::Eq | CmpOp::Ne);
                if ordered && [ka, kb].iter().any(|k| matches!(k, Kind::Str | Kind::Bool)) {
                    return Err(format!("only numbers can be ordered ({} and {})", show(a), show(b)));
                }
                Ok(())
            }
            Expr::In(o, set) => {
                let k = kind_of(o)?;
                // One kind in the set, and the operand's.
                let want = if k == Kind::Unknown { set.first().map_or(k, Scalar::kind) } else { k };
                match set.iter().find(|s| s.kind() != want) {
                    Some(s) => Err(format!("{} is {want}, but the set holds {s}", show(o))),
                    None => Ok(()),
                }
            }
            Expr::Not(e) => e.check(kind_of),
            Expr::And(es) | Expr::Or(es) => es.iter().try_for_each(|e| e.check(kind_of)),
        }
    }

    /// Evaluates the condition; `value_of` reads an operand's value at run time.
    pub fn eval(&self, value_of: &dyn Fn(&Operand) -> Result<Scalar, String>) -> Result<bool, String> {
        Ok(match self {
            Expr::Is(o) => match value_of(o)? {
                Scalar::Bool(b) => b,
                other => return Err(format!("{} is {other}, not a boolean", show(o))),
            },
            Expr::Cmp(a, op, b) => {
                compare(&value_of(a)?, *op, &value_of(b)?).map_err(|e| format!("{}: {e}", show(a)))?
            }
            Expr::In(o, set) => {
                let v = value_of(o)?;
                let mut found = false;
                for s in set {
                    found |= compare(&v, CmpOp::Eq, s)?;
                }
                found
            }
            Expr::Not(e) => !e.eval(value_of)?,
            Expr::And(es) => {
                for e in es {
                    if !e.eval(value_of)? {
                        return Ok(false);
                    }
                }
                true
            }
            Expr::Or(es) => {
                for e in es {
                    if e.eval(value_of)? {
                        return Ok(true);
                    }
                }
                false
            }
        })
    }
}

fn compare(a: &Scalar, op: CmpOp, b: &Scalar) -> Result<bool, String> {
    let ord = match (a, b) {
        (Scalar::Num(x), Scalar::Num(y)) => x.partial_cmp(y),
        (Scalar::Str(x), Scalar::Str(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => Some(x.cmp(y)),
        (Scalar::Bool(x), Scalar::Bool(y)) if matches!(op, CmpOp::Eq | CmpOp::Ne) => Some(x.cmp(y)),
        _ => return Err(format!("cannot compare {a} with {b}")),
    };
    use std::cmp::Ordering::*;
    Ok(match (op, ord) {
        (_, None) => op == CmpOp::Ne, // NaN equals nothing
        (CmpOp::Eq, Some(o)) => o == Equal,
        (CmpOp::Ne, Some(o)) => o != Equal,
        (CmpOp::Lt, Some(o)) => o == Less,
        (CmpOp::Le, Some(o)) => o != Greater,
        (CmpOp::Gt, Some(o)) => o == Greater,
        (CmpOp::Ge, Some(o)) => o != Less,
    })
}

fn show(o: &Operand) -> String {
    match o {
        Operand::Lit(s) => s.to_string(),
        Operand::Param(p) => format!("${p}"),
        Operand::Ref(r) => format!("'{r}'"),
        Operand::Len(r) => format!("len({r})"),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Ident(String),
    Param(String),
    Op(&'static str),
}

fn lex(text: &str) -> Result<Vec<Tok>, String> {
    let mut toks = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-';
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if c == b'\'' || c == b'"' {
            let end = text[i + 1..].find(c as char).ok_or_else(|| format!("unclosed string at column {}", i + 1))?;
            toks.push(Tok::Str(text[i + 1..i + 1 + end].to_string()));
            i += end + 2;
        } else if c.is_ascii_digit() || (c == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            let start = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || matches!(b[i], b'.' | b'e' | b'E')) {
                // An exponent's sign: 1e-5.
                let signed = matches!(b[i], b'e' | b'E') && matches!(b.get(i + 1), Some(b'-' | b'+'));
                i += 1 + usize::from(signed);
            }
            let s = &text[start..i];
            toks.push(Tok::Num(s.parse().map_err(|_| format!("bad number '{s}'"))?));
        } else if c == b'$' {
            let start = i + 1;
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            if start == i {
                return Err(format!("'$' at column {start} names no parameter"));
            }
            toks.push(Tok::Param(text[start..i].to_string()));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < b.len() && ident(b[i]) {
                i += 1;
            }
            toks.push(Tok::Ident(text[start..i].to_string()));
        } else {
            let two = text.get(i..i + 2).unwrap_or("");
            let op = ["==", "!=", "<=", ">="].into_iter().find(|o| *o == two);
            let op = match op {
                Some(o) => o,
                None => match c {
                    b'<' => "<",
                    b'>' => ">",
                    b'(' => "(",
                    b')' => ")",
                    b'[' => "[",
                    b']' => "]",
                    b',' => ",",
                    _ => {
                        return Err(format!(
                            "unexpected '{}' at column {}",
                            &text[i..].chars().next().unwrap_or(' '),
                            i + 1
                        ))
                    }
                },
            };
            i += op.len();
            toks.push(Tok::Op(op));
        }
    }
    Ok(toks)
}

/// Parses a condition.
pub fn parse(text: &str) -> Result<Expr, String> {
    if text.len() > MAX_LEN {
        return Err(format!("a condition may be at most {MAX_LEN} bytes"));
    }
    let mut p = Parser { toks: lex(text)?, at: 0, depth: 0 };
    if p.toks.is_empty() {
        return Err("the condition is empty".into());
    }
    let e = p.or()?;
    match p.toks.get(p.at) {
        None => Ok(e),
        Some(t) => Err(format!("unexpected {} after a complete condition", shown(t))),
    }
}

fn shown(t: &Tok) -> String {
    match t {
        Tok::Num(n) => format!("'{n}'"),
        Tok::Str(s) => format!("'{s}'"),
        Tok::Ident(s) => format!("'{s}'"),
        Tok::Param(s) => format!("'${s}'"),
        Tok::Op(o) => format!("'{o}'"),
    }
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
    depth: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn next(&mut self) -> Result<Tok, String> {
        let t = self.toks.get(self.at).cloned().ok_or("the condition ends too early")?;
        self.at += 1;
        Ok(t)
    }

    fn eat_word(&mut self, w: &str) -> bool {
        let hit = matches!(self.peek(), Some(Tok::Ident(s)) if s == w);
        self.at += usize::from(hit);
        hit
    }

    fn expect(&mut self, op: &str) -> Result<(), String> {
        match self.next()? {
            Tok::Op(o) if o == op => Ok(()),
            t => Err(format!("expected '{op}', found {}", shown(&t))),
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("parentheses and `not` nest at most {MAX_DEPTH} deep"));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut es = vec![self.and()?];
        while self.eat_word("or") {
            es.push(self.and()?);
        }
        Ok(if es.len() == 1 { es.pop().expect("one") } else { Expr::Or(es) })
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut es = vec![self.unary()?];
        while self.eat_word("and") {
            es.push(self.unary()?);
        }
        Ok(if es.len() == 1 { es.pop().expect("one") } else { Expr::And(es) })
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.eat_word("not") {
            self.deeper()?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, String> {
        if matches!(self.peek(), Some(Tok::Op("("))) {
            self.at += 1;
            self.deeper()?;
            let e = self.or()?;
            self.depth -= 1;
            self.expect(")")?;
            return Ok(e);
        }
        let a = self.operand()?;
        if self.eat_word("in") {
            self.expect("[")?;
            let mut set = Vec::new();
            loop {
                match self.operand()? {
                    Operand::Lit(s) => set.push(s),
                    o => return Err(format!("`in [...]` takes literals, not {}", show(&o))),
                }
                match self.next()? {
                    Tok::Op(",") => continue,
                    Tok::Op("]") => break,
                    t => return Err(format!("expected ',' or ']', found {}", shown(&t))),
                }
            }
            return Ok(Expr::In(a, set));
        }
        let op = match self.peek() {
            Some(Tok::Op("==")) => CmpOp::Eq,
            Some(Tok::Op("!=")) => CmpOp::Ne,
            Some(Tok::Op("<")) => CmpOp::Lt,
            Some(Tok::Op("<=")) => CmpOp::Le,
            Some(Tok::Op(">")) => CmpOp::Gt,
            Some(Tok::Op(">=")) => CmpOp::Ge,
            _ => return Ok(Expr::Is(a)),
        };
        self.at += 1;
        Ok(Expr::Cmp(a, op, self.operand()?))
    }

    fn operand(&mut self) -> Result<Operand, String> {
        Ok(match self.next()? {
            Tok::Num(n) => Operand::Lit(Scalar::Num(n)),
            Tok::Str(s) => Operand::Lit(Scalar::Str(s)),
            Tok::Param(p) => Operand::Param(p),
            Tok::Ident(w) if w == "true" || w == "false" => Operand::Lit(Scalar::Bool(w == "true")),
            Tok::Ident(w) if w == "len" => {
                self.expect("(")?;
                let r = match self.next()? {
                    Tok::Ident(r) => r,
                    t => return Err(format!("len() takes node.output, not {}", shown(&t))),
                };
                self.expect(")")?;
                Operand::Len(r)
            }
            Tok::Ident(w) if matches!(w.as_str(), "and" | "or" | "not" | "in") => {
                return Err(format!("expected a value, found '{w}'"))
            }
            Tok::Ident(r) => Operand::Ref(r),
            t => return Err(format!("expected a value, found {}", shown(&t))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, vals: &[(&str, Scalar)]) -> Result<bool, String> {
        let e = parse(text)?;
        e.eval(&|o| match o {
            Operand::Lit(s) => Ok(s.clone()),
            Operand::Param(p) | Operand::Ref(p) | Operand::Len(p) => {
                vals.iter().find(|(n, _)| n == p).map(|(_, v)| v.clone()).ok_or(format!("no {p}"))
            }
        })
    }

    #[test]
    fn conditions_parse_and_evaluate() {
        let n = |v| Scalar::Num(v);
        assert_eq!(eval("count.count > 0", &[("count.count", n(2.0))]), Ok(true));
        assert_eq!(eval("count.count > 0", &[("count.count", n(0.0))]), Ok(false));
        let vals = [("lang", Scalar::Str("en".into())), ("nms.classes", n(2.0)), ("debug", Scalar::Bool(true))];
        assert_eq!(eval("$lang == 'en' and nms.classes in [1, 2]", &vals), Ok(true));
        assert_eq!(eval("not ($lang != \"en\") or $debug", &vals), Ok(true));
        assert_eq!(eval("$debug and not $debug", &vals), Ok(false));
        assert_eq!(eval("nms.classes >= -1.5e0", &vals), Ok(true));
        assert_eq!(eval("nms.classes > 1e-5", &vals), Ok(true));
        assert_eq!(eval("len(crop.crops) <= 3", &[("crop.crops", n(3.0))]), Ok(true));
        let e = parse("a.b > 0 or (len(c.d) == 2 and $p)").unwrap();
        assert_eq!(e.refs(), vec!["a.b", "c.d"]);
        assert_eq!(e.params(), vec!["p"]);
    }

    #[test]
    fn malformed_conditions_say_where() {
        for (text, says) in [
            ("", "empty"),
            ("a.b >", "ends too early"),
            ("a.b > 0 0", "unexpected '0' after a complete condition"),
            ("a.b ~ 1", "unexpected '~' at column 5"),
            ("'open", "unclosed string at column 1"),
            ("a.b in [x.y]", "takes literals"),
            ("and > 1", "expected a value, found 'and'"),
            ("$ > 1", "names no parameter"),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn nesting_is_bounded_before_it_can_exhaust_the_stack() {
        let deep = format!("{}a.b{}", "(".repeat(17), ")".repeat(17));
        assert!(parse(&deep).unwrap_err().contains("at most 16 deep"));
        assert!(parse(&format!("{}a.b", "not ".repeat(200))).unwrap_err().contains("at most 16 deep"));
        assert!(parse(&format!("{}a.b{}", "(".repeat(16), ")".repeat(16))).is_ok());
        assert!(parse(&"a.b or ".repeat(200)).unwrap_err().contains("at most 1024 bytes"));
    }

    #[test]
    fn kinds_are_checked() {
        let kinds = |o: &Operand| {
            Ok(match o {
                Operand::Lit(s) => s.kind(),
                Operand::Len(_) => Kind::Num,
                Operand::Param(_) => Kind::Str,
                Operand::Ref(_) => Kind::Num,
            })
        };
        let check = |t: &str| parse(t).unwrap().check(&kinds);
        assert!(check("a.b > 1 and $p == 'x'").is_ok());
        assert!(check("$p > 'x'").unwrap_err().contains("only numbers can be ordered"));
        assert!(check("a.b == 'x'").unwrap_err().contains("'a.b' is a number but 'x' is a string"));
        assert!(check("a.b").unwrap_err().contains("not a condition"));
        assert!(check("a.b in [1, 'x']").unwrap_err().contains("the set holds 'x'"));
    }
}
