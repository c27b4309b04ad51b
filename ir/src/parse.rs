//! The text format's parser: reads what [`crate::print`] writes. Errors give `line:column`, what
//! was expected and what was found; no input makes it panic.
//!
//! Grammar (whitespace and `#` comments are free between tokens):
//!
//! ```text
//! module  := "needle_ir" "v1" item*
//! item    := "dim" sym "in" int "..=" int
//!          | "const" @name ":" type kind storage
//!          | "buffer" $name ":" type
//!          | "func" @name "(" [%name ":" type ("," ...)*] ")" "{" inst* "return" [%name ("," %name)*] "}"
//! inst    := %name "=" op ":" type | "store" %name "->" $name "[" expr ".." "]"
//! type    := elem "[" [expr ("," expr)*] "]"
//! expr    := ["-"] term (("+" | "-") term)*      term := int ["*" sym] | sym
//! operand := %name | @name | $name "[" ".." expr "]"
//! ```

use std::fmt;

use crate::module::{BufferDecl, ConstDecl, DimDecl, Function, Inst, Module, Op, Operand, Param};
use crate::types::{ConstKind, ElemType, Expr, Storage, Sym, Type};

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: expected {expected}, found {found}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub expected: String,
    pub found: String,
}

pub fn parse(text: &str) -> Result<Module, ParseError> {
    let toks = lex(text)?;
    let mut p = Parser { toks, pos: 0 };
    p.module()
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    /// `%name`
    Value(String),
    /// `@name`
    Global(String),
    /// `$name`
    Buffer(String),
    Ident(String),
    /// A number's text; ints and floats are told apart where one is expected.
    Num(String),
    /// Punctuation: `( ) { } [ ] , : = + - * .. ..= ->`.
    Punct(&'static str),
    Eof,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Value(s) => write!(f, "`%{s}`"),
            Tok::Global(s) => write!(f, "`@{s}`"),
            Tok::Buffer(s) => write!(f, "`${s}`"),
            Tok::Ident(s) | Tok::Num(s) => write!(f, "`{s}`"),
            Tok::Punct(s) => write!(f, "`{s}`"),
            Tok::Eof => write!(f, "end of input"),
        }
    }
}

struct Spanned {
    tok: Tok,
    line: usize,
    col: usize,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

fn lex(text: &str) -> Result<Vec<Spanned>, ParseError> {
    const PUNCT: [&str; 15] = [
        "..=", "..", "->", "(", ")", "{", "}", "[", "]", ",", ":", "=", "+", "-", "*",
    ];
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let mut out = Vec::new();
    let at = |i: usize| chars.get(i).copied();
    while let Some(c) = at(i) {
        let (start_line, start_col) = (line, col);
        let start = i;
        if c == '\n' {
            i += 1;
            line += 1;
            col = 1;
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            col += 1;
            continue;
        }
        if c == '#' {
            while at(i).is_some_and(|c| c != '\n') {
                i += 1;
            }
            continue;
        }
        let tok = if matches!(c, '%' | '@' | '$') {
            i += 1;
            while at(i).is_some_and(is_name_char) {
                i += 1;
            }
            let name: String = chars[start + 1..i].iter().collect();
            if name.is_empty() {
                return Err(ParseError {
                    line,
                    col,
                    expected: format!("a name after `{c}`"),
                    found: describe_char(at(i)),
                });
            }
            match c {
                '%' => Tok::Value(name),
                '@' => Tok::Global(name),
                _ => Tok::Buffer(name),
            }
        } else if c.is_ascii_alphabetic() || c == '_' {
            while at(i).is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
                i += 1;
            }
            Tok::Ident(chars[start..i].iter().collect())
        } else if c.is_ascii_digit() {
            while at(i).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
            }
            // A fraction only when a digit follows the dot, so `1..=9` lexes as `1` `..=` `9`.
            if at(i) == Some('.') && at(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                i += 1;
                while at(i).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                }
            }
            if matches!(at(i), Some('e' | 'E')) {
                let digits_at = if matches!(at(i + 1), Some('+' | '-')) {
                    i + 2
                } else {
                    i + 1
                };
                if at(digits_at).is_some_and(|c| c.is_ascii_digit()) {
                    i = digits_at;
                    while at(i).is_some_and(|c| c.is_ascii_digit()) {
                        i += 1;
                    }
                }
            }
            Tok::Num(chars[start..i].iter().collect())
        } else if let Some(p) = PUNCT
            .iter()
            .find(|p| p.chars().enumerate().all(|(k, pc)| at(i + k) == Some(pc)))
        {
            i += p.len();
            Tok::Punct(p)
        } else {
            return Err(ParseError {
                line,
                col,
                expected: "a token".into(),
                found: describe_char(Some(c)),
            });
        };
        col += i - start;
        out.push(Spanned {
            tok,
            line: start_line,
            col: start_col,
        });
    }
    out.push(Spanned {
        tok: Tok::Eof,
        line,
        col,
    });
    Ok(out)
}

fn describe_char(c: Option<char>) -> String {
    match c {
        Some(c) => format!("{c:?}"),
        None => "end of input".into(),
    }
}

struct Parser {
    toks: Vec<Spanned>,
    pos: usize,
}

type PResult<T> = Result<T, ParseError>;

impl Parser {
    fn peek(&self) -> &Tok {
        // The lexer always ends with Eof and `bump` never moves past it.
        self.toks.get(self.pos).map_or(&Tok::Eof, |s| &s.tok)
    }

    fn bump(&mut self) -> Tok {
        let tok = self.peek().clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        tok
    }

    fn err<T>(&self, expected: impl Into<String>) -> PResult<T> {
        let (line, col) = self.toks.get(self.pos).map_or((0, 0), |s| (s.line, s.col));
        Err(ParseError {
            line,
            col,
            expected: expected.into(),
            found: self.peek().to_string(),
        })
    }

    fn at_punct(&self, p: &str) -> bool {
        matches!(self.peek(), Tok::Punct(q) if *q == p)
    }

    fn at_ident(&self, word: &str) -> bool {
        matches!(self.peek(), Tok::Ident(w) if w == word)
    }

    fn punct(&mut self, p: &str) -> PResult<()> {
        if self.at_punct(p) {
            self.bump();
            Ok(())
        } else {
            self.err(format!("`{p}`"))
        }
    }

    fn keyword(&mut self, word: &str) -> PResult<()> {
        if self.at_ident(word) {
            self.bump();
            Ok(())
        } else {
            self.err(format!("`{word}`"))
        }
    }

    /// `v`, read from the current token, which this consumes.
    fn consumed<T>(&mut self, v: T) -> PResult<T> {
        self.bump();
        Ok(v)
    }

    fn ident(&mut self, what: &str) -> PResult<String> {
        let Tok::Ident(name) = self.peek() else {
            return self.err(what);
        };
        self.consumed(name.clone())
    }

    fn value(&mut self) -> PResult<String> {
        let Tok::Value(name) = self.peek() else {
            return self.err("a value `%name`");
        };
        self.consumed(name.clone())
    }

    fn global(&mut self, what: &str) -> PResult<String> {
        let Tok::Global(name) = self.peek() else {
            return self.err(what);
        };
        self.consumed(name.clone())
    }

    fn buffer(&mut self) -> PResult<String> {
        let Tok::Buffer(name) = self.peek() else {
            return self.err("a buffer `$name`");
        };
        self.consumed(name.clone())
    }

    fn int(&mut self) -> PResult<i64> {
        let negative = self.at_punct("-");
        if negative {
            self.bump();
        }
        match self.peek() {
            Tok::Num(s) => match s.parse::<i64>() {
                Ok(n) => {
                    self.bump();
                    Ok(if negative { -n } else { n })
                }
                Err(_) => self.err("an integer that fits in 64 bits"),
            },
            _ => self.err("an integer"),
        }
    }

    fn float(&mut self) -> PResult<f32> {
        let negative = self.at_punct("-");
        if negative {
            self.bump();
        }
        let v = match self.peek() {
            Tok::Num(s) => s.parse::<f32>().ok(),
            Tok::Ident(s) if s == "NaN" || s == "inf" => s.parse::<f32>().ok(),
            _ => None,
        };
        match v {
            Some(v) => {
                self.bump();
                Ok(if negative { -v } else { v })
            }
            None => self.err("a number"),
        }
    }

    fn module(&mut self) -> PResult<Module> {
        self.keyword("needle_ir")?;
        self.keyword("v1")?;
        let mut m = Module {
            dims: vec![],
            consts: vec![],
            buffers: vec![],
            funcs: vec![],
        };
        loop {
            match self.peek() {
                Tok::Eof => return Ok(m),
                Tok::Ident(w) if w == "dim" => m.dims.push(self.dim()?),
                Tok::Ident(w) if w == "const" => m.consts.push(self.const_decl()?),
                Tok::Ident(w) if w == "buffer" => m.buffers.push(self.buffer_decl()?),
                Tok::Ident(w) if w == "func" => m.funcs.push(self.function()?),
                _ => return self.err("`dim`, `const`, `buffer`, `func` or end of input"),
            }
        }
    }

    fn sym(&mut self) -> PResult<Sym> {
        match self.peek() {
            Tok::Ident(w) => match Sym::ALL.iter().find(|s| s.name() == w) {
                Some(&s) => {
                    self.bump();
                    Ok(s)
                }
                None => self.err("a symbol (`q`, `p` or `a`)"),
            },
            _ => self.err("a symbol (`q`, `p` or `a`)"),
        }
    }

    fn dim(&mut self) -> PResult<DimDecl> {
        self.keyword("dim")?;
        let sym = self.sym()?;
        self.keyword("in")?;
        let min = self.int()?;
        self.punct("..=")?;
        let max = self.int()?;
        Ok(DimDecl { sym, min, max })
    }

    fn const_decl(&mut self) -> PResult<ConstDecl> {
        self.keyword("const")?;
        let name = self.global("a constant `@name`")?;
        self.punct(":")?;
        let ty = self.ty()?;
        let kind = match self.peek() {
            Tok::Ident(w) => ConstKind::ALL.iter().find(|k| k.name() == w).copied(),
            _ => None,
        };
        let Some(kind) = kind else {
            return self.err("a constant kind (`weight`, `folded_kv`, `rope_table`, ...)");
        };
        self.bump();
        let storage = self.storage()?;
        Ok(ConstDecl {
            name,
            ty,
            kind,
            storage,
        })
    }

    fn storage(&mut self) -> PResult<Storage> {
        let expected = "a storage (`plain`, `f16`, `i8gN` or `i4gN`)";
        let Tok::Ident(w) = self.peek() else {
            return self.err(expected);
        };
        let group = |prefix: &str| -> Option<u32> {
            w.strip_prefix(prefix)
                .and_then(|g| g.parse::<u32>().ok())
                .filter(|&g| g > 0)
        };
        let storage = if w == "plain" {
            Storage::Plain
        } else if w == "f16" {
            Storage::F16
        } else if let Some(group) = group("i8g") {
            Storage::I8 { group }
        } else if let Some(group) = group("i4g") {
            Storage::I4 { group }
        } else {
            return self.err(expected);
        };
        self.bump();
        Ok(storage)
    }

    fn buffer_decl(&mut self) -> PResult<BufferDecl> {
        self.keyword("buffer")?;
        let name = self.buffer()?;
        self.punct(":")?;
        let ty = self.ty()?;
        Ok(BufferDecl { name, ty })
    }

    fn ty(&mut self) -> PResult<Type> {
        let expected = "an element type (`f32`, `i32`, `u8`)";
        let elem = match self.peek() {
            Tok::Ident(w) => ElemType::ALL.iter().find(|e| e.name() == w).copied(),
            _ => None,
        };
        let Some(elem) = elem else {
            return self.err(expected);
        };
        self.bump();
        self.punct("[")?;
        let mut shape = Vec::new();
        if !self.at_punct("]") {
            shape.push(self.expr()?);
            while self.at_punct(",") {
                self.bump();
                shape.push(self.expr()?);
            }
        }
        self.punct("]")?;
        Ok(Type { elem, shape })
    }

    fn expr(&mut self) -> PResult<Expr> {
        let mut negative = self.at_punct("-");
        if negative {
            self.bump();
        }
        let mut e = Expr::default();
        loop {
            let term = self.term()?;
            let term = if negative {
                match term.checked_neg() {
                    Some(e) => e,
                    None => return self.err("a smaller number"),
                }
            } else {
                term
            };
            e = match e.checked_add(term) {
                Some(e) => e,
                None => return self.err("a smaller number"),
            };
            if self.at_punct("+") {
                negative = false;
            } else if self.at_punct("-") {
                negative = true;
            } else {
                return Ok(e);
            }
            self.bump();
        }
    }

    fn term(&mut self) -> PResult<Expr> {
        match self.peek() {
            Tok::Num(_) => {
                let n = self.int()?;
                if !self.at_punct("*") {
                    return Ok(Expr::lit(n));
                }
                self.bump();
                let s = self.sym()?;
                Ok(Expr::default().with_coeff(s, n))
            }
            Tok::Ident(_) => Ok(Expr::sym(self.sym()?)),
            _ => self.err("an integer or a symbol (`q`, `p` or `a`)"),
        }
    }

    fn function(&mut self) -> PResult<Function> {
        self.keyword("func")?;
        let name = self.global("a function name `@name`")?;
        self.punct("(")?;
        let mut params = Vec::new();
        if !self.at_punct(")") {
            loop {
                let name = self.value()?;
                self.punct(":")?;
                params.push(Param {
                    name,
                    ty: self.ty()?,
                });
                if !self.at_punct(",") {
                    break;
                }
                self.bump();
            }
        }
        self.punct(")")?;
        self.punct("{")?;
        let mut body = Vec::new();
        loop {
            match self.peek() {
                Tok::Ident(w) if w == "return" => break,
                Tok::Ident(w) if w == "store" => body.push(self.store()?),
                Tok::Value(_) => body.push(self.inst()?),
                _ => return self.err("an instruction or `return`"),
            }
        }
        self.keyword("return")?;
        let mut results = Vec::new();
        if matches!(self.peek(), Tok::Value(_)) {
            results.push(self.value()?);
            while self.at_punct(",") {
                self.bump();
                results.push(self.value()?);
            }
        }
        self.punct("}")?;
        Ok(Function {
            name,
            params,
            body,
            results,
        })
    }

    fn store(&mut self) -> PResult<Inst> {
        self.keyword("store")?;
        let value = self.value()?;
        self.punct("->")?;
        let buffer = self.buffer()?;
        self.punct("[")?;
        let at = self.expr()?;
        self.punct("..")?;
        self.punct("]")?;
        Ok(Inst {
            result: None,
            op: Op::Store { value, buffer, at },
        })
    }

    fn inst(&mut self) -> PResult<Inst> {
        let name = self.value()?;
        self.punct("=")?;
        let op = self.op()?;
        self.punct(":")?;
        let ty = self.ty()?;
        Ok(Inst {
            result: Some(Param { name, ty }),
            op,
        })
    }

    fn comma(&mut self) -> PResult<()> {
        self.punct(",")
    }

    fn constant(&mut self) -> PResult<String> {
        self.global("a constant `@name`")
    }

    fn attr(&mut self, key: &str) -> PResult<()> {
        self.keyword(key)?;
        self.punct("=")
    }

    fn op(&mut self) -> PResult<Op> {
        let word = self.ident("an op name")?;
        let op = match word.as_str() {
            "embed" => {
                let table = self.constant()?;
                self.comma()?;
                let ids = self.value()?;
                self.comma()?;
                self.attr("scale")?;
                Op::Embed {
                    table,
                    ids,
                    scale: self.float()?,
                }
            }
            "concat" => {
                let mut parts = vec![self.operand()?];
                while self.at_punct(",") {
                    self.bump();
                    parts.push(self.operand()?);
                }
                Op::Concat { parts }
            }
            "matmul" => {
                let x = self.value()?;
                self.comma()?;
                Op::MatMul {
                    x,
                    w: self.constant()?,
                }
            }
            "reshape" => Op::Reshape { x: self.value()? },
            "zcrmsnorm" => {
                let x = self.value()?;
                self.comma()?;
                Op::ZcRmsNorm {
                    x,
                    scale: self.constant()?,
                }
            }
            "rmsnorm" => {
                let x = self.value()?;
                let scale = if self.at_punct(",") {
                    self.bump();
                    Some(self.constant()?)
                } else {
                    None
                };
                Op::RmsNorm { x, scale }
            }
            "rope" => {
                let x = self.value()?;
                self.comma()?;
                let table = self.constant()?;
                self.comma()?;
                self.attr("start")?;
                Op::Rope {
                    x,
                    table,
                    start: self.expr()?,
                }
            }
            "attention" => {
                let q = self.value()?;
                let mut kv = Vec::new();
                while self.at_punct(",") {
                    self.bump();
                    self.punct("(")?;
                    let k = self.operand()?;
                    self.comma()?;
                    let v = self.operand()?;
                    self.punct(")")?;
                    kv.push((k, v));
                }
                Op::Attention { q, kv }
            }
            "gated_residual" | "residual" => {
                let x = self.value()?;
                self.comma()?;
                let y = self.value()?;
                self.comma()?;
                let c = self.constant()?;
                if word == "residual" {
                    Op::Residual { x, y, scale: c }
                } else {
                    Op::GatedResidual { x, y, gate: c }
                }
            }
            "logits" => {
                let x = self.value()?;
                self.comma()?;
                Op::Logits {
                    x,
                    table: self.constant()?,
                }
            }
            "argmax_masked" => {
                let logits = self.value()?;
                self.comma()?;
                Op::ArgmaxMasked {
                    logits,
                    allowed: self.value()?,
                }
            }
            _ => {
                // Point at the op name itself, not the token after it.
                self.pos = self.pos.saturating_sub(1);
                return self.err("an op name (`embed`, `matmul`, `attention`, ...)");
            }
        };
        Ok(op)
    }

    fn operand(&mut self) -> PResult<Operand> {
        match self.peek().clone() {
            Tok::Value(v) => {
                self.bump();
                Ok(Operand::Value(v))
            }
            Tok::Global(c) => {
                self.bump();
                Ok(Operand::Const(c))
            }
            Tok::Buffer(name) => {
                self.bump();
                self.punct("[")?;
                self.punct("..")?;
                let len = self.expr()?;
                self.punct("]")?;
                Ok(Operand::Buffer { name, len })
            }
            _ => self.err("an operand (`%value`, `@constant` or `$buffer[..len]`)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_sample::SAMPLE;

    fn error(text: &str) -> ParseError {
        parse(text).expect_err("should not parse")
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let e = error("module");
        assert_eq!((e.line, e.col), (1, 1));
        assert_eq!(e.to_string(), "1:1: expected `needle_ir`, found `module`");

        let text = SAMPLE.replacen("%q = matmul %n, @wq", "%q = frobnicate %n, @wq", 1);
        let e = error(&text);
        assert_eq!((e.line, e.col), (28, 8), "{e}");
        assert!(e.expected.starts_with("an op name"), "{e}");
        assert_eq!(e.found, "`frobnicate`");

        let e = error(&SAMPLE.replacen("f32[q+3,8]", "f32[q+3 8]", 1));
        assert_eq!(
            (e.line, e.expected.as_str(), e.found.as_str()),
            (26, "`]`", "`8`")
        );

        let e = error(&SAMPLE.replacen("tool_tokens plain", "grammar_table plain", 1));
        assert!(e.expected.starts_with("a constant kind"), "{e}");
        assert_eq!(e.found, "`grammar_table`");

        let e = error(&SAMPLE.replacen("weight i8g4", "weight i8g0", 1));
        assert!(e.expected.contains("storage"), "{e}");

        let e = error(&SAMPLE[..SAMPLE.len() - 3]);
        assert_eq!(e.found, "end of input");
        assert_eq!(e.expected, "`}`");

        let e = error("needle_ir v1\n  dim q in 0..=3 !");
        assert_eq!(e.to_string(), "2:18: expected a token, found '!'");
    }

    #[test]
    fn numbers_too_large_are_errors() {
        let e = error("needle_ir v1 dim q in 0..=99999999999999999999");
        assert_eq!(e.expected, "an integer that fits in 64 bits");
        let e = error("needle_ir v1 buffer $b : f32[9223372036854775807+1]");
        assert_eq!(e.expected, "a smaller number");
        let e = error("needle_ir v1 buffer $b : f32[-9223372036854775807-2]");
        assert_eq!(e.expected, "a smaller number");
    }

    /// The parser sees untrusted text: every prefix and many corruptions of a valid module must
    /// give a result, not a panic.
    #[test]
    fn never_panics() {
        let chars: Vec<char> = SAMPLE.chars().collect();
        for end in 0..chars.len() {
            let _ = parse(&chars[..end].iter().collect::<String>());
        }
        let replacements = [
            '%', '@', '$', '.', '-', '9', '[', ']', '(', ' ', 'é', '\n', '=',
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..5000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut text = chars.clone();
            let at = (seed % text.len() as u64) as usize;
            match (seed >> 32) % 3 {
                0 => {
                    text.remove(at);
                }
                1 => text[at] = replacements[(seed >> 40) as usize % replacements.len()],
                _ => text.insert(at, replacements[(seed >> 48) as usize % replacements.len()]),
            }
            if let Ok(m) = parse(&text.iter().collect::<String>()) {
                // Whatever parses must also verify or fail cleanly, and print.
                let _ = crate::verify(&m);
                let _ = crate::print(&m);
            }
        }
    }
}
