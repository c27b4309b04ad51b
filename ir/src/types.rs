//! Element types, symbolic dimensions, tensor types and constant attributes.

use std::fmt;

/// Element type of a run-time tensor or of a constant's logical values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    I32,
    /// Bytes.
    U8,
}

impl ElemType {
    pub const ALL: [ElemType; 3] = [ElemType::F32, ElemType::I32, ElemType::U8];

    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::I32 => "i32",
            ElemType::U8 => "u8",
        }
    }

    /// Bytes per element, for workspace planning.
    pub fn size(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::U8 => 1,
        }
    }
}

/// The run-time sizes a module is generic over. Everything else is static.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sym {
    /// Query length in tokens: fixed by `encode_query`, seen by every later `decoder_step`.
    Q,
    /// Position of the token a `decoder_step` consumes (0 for the initial EOS).
    P,
    /// How many token ids a `decoder_step` may choose among (the grammar's allowed list; 0 when
    /// the step is unconstrained): the length of its `%allowed : i32[a]`.
    A,
}

impl Sym {
    pub const ALL: [Sym; 3] = [Sym::Q, Sym::P, Sym::A];

    pub fn name(self) -> &'static str {
        match self {
            Sym::Q => "q",
            Sym::P => "p",
            Sym::A => "a",
        }
    }

    /// What the symbol stands for, in words (for messages).
    pub fn meaning(self) -> &'static str {
        match self {
            Sym::Q => "the query length",
            Sym::P => "the decoder position",
            Sym::A => "the allowed-id count",
        }
    }

    /// Whether the symbol exists in `encode_query`, which runs before any decoder step.
    pub fn in_encoder(self) -> bool {
        self == Sym::Q
    }
}

/// An affine expression `q_coeff*q + p_coeff*p + a_coeff*a + offset`: a dimension, a row offset
/// or a position. Affine is all the model needs (`q+37`, `p+1`, `987-q`), and it keeps equality
/// structural: two shapes agree exactly when their expressions are equal.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Expr {
    pub q: i64,
    pub p: i64,
    pub a: i64,
    pub offset: i64,
}

impl Expr {
    pub const fn lit(n: i64) -> Expr {
        Expr {
            q: 0,
            p: 0,
            a: 0,
            offset: n,
        }
    }

    pub const fn sym(s: Sym) -> Expr {
        Expr::lit(0).with_coeff(s, 1)
    }

    /// The same expression with `s`'s coefficient set to `c`.
    pub const fn with_coeff(mut self, s: Sym, c: i64) -> Expr {
        match s {
            Sym::Q => self.q = c,
            Sym::P => self.p = c,
            Sym::A => self.a = c,
        }
        self
    }

    pub fn coeff(&self, s: Sym) -> i64 {
        match s {
            Sym::Q => self.q,
            Sym::P => self.p,
            Sym::A => self.a,
        }
    }

    /// The value when no symbol occurs, else `None`.
    pub fn as_static(&self) -> Option<i64> {
        Sym::ALL
            .iter()
            .all(|&s| self.coeff(s) == 0)
            .then_some(self.offset)
    }

    /// Sum, or `None` on overflow (only reachable from absurd parsed input).
    pub fn checked_add(self, other: Expr) -> Option<Expr> {
        Some(Expr {
            q: self.q.checked_add(other.q)?,
            p: self.p.checked_add(other.p)?,
            a: self.a.checked_add(other.a)?,
            offset: self.offset.checked_add(other.offset)?,
        })
    }

    /// `-self`, or `None` on overflow.
    pub fn checked_neg(self) -> Option<Expr> {
        Some(Expr {
            q: self.q.checked_neg()?,
            p: self.p.checked_neg()?,
            a: self.a.checked_neg()?,
            offset: self.offset.checked_neg()?,
        })
    }

    /// Smallest and largest value over the symbols' ranges (`bounds(s)` = inclusive range of
    /// `s`). Affine, so the extremes are at the corners; i128 so that no input can overflow.
    pub fn range(&self, bounds: impl Fn(Sym) -> (i64, i64)) -> (i128, i128) {
        let (mut lo, mut hi) = (self.offset as i128, self.offset as i128);
        for s in Sym::ALL {
            let c = self.coeff(s) as i128;
            if c == 0 {
                continue;
            }
            let (a, b) = bounds(s);
            let (a, b) = (c * a as i128, c * b as i128);
            lo += a.min(b);
            hi += a.max(b);
        }
        (lo, hi)
    }
}

impl fmt::Display for Expr {
    /// Canonical text: symbols in `Sym` order, then the offset; `987-q` rather than `-q+987`
    /// when the first symbol is negated, since that is how a reader writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<(i64, &str)> = Sym::ALL
            .iter()
            .map(|&s| (self.coeff(s), s.name()))
            .filter(|&(c, _)| c != 0)
            .collect();
        if terms.is_empty() {
            return write!(f, "{}", self.offset);
        }
        let offset_first = terms[0].0 < 0 && self.offset != 0;
        if offset_first {
            write!(f, "{}", self.offset)?;
        }
        for (i, &(c, name)) in terms.iter().enumerate() {
            let sign = if c < 0 {
                "-"
            } else if i > 0 || offset_first {
                "+"
            } else {
                ""
            };
            match c.unsigned_abs() {
                1 => write!(f, "{sign}{name}")?,
                n => write!(f, "{sign}{n}*{name}")?,
            }
        }
        if !offset_first && self.offset != 0 {
            write!(f, "{:+}", self.offset)?;
        }
        Ok(())
    }
}

/// A tensor type: element type and row-major shape. Rank 0 is a scalar.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub elem: ElemType,
    pub shape: Vec<Expr>,
}

impl Type {
    pub fn new(elem: ElemType, shape: Vec<Expr>) -> Type {
        Type { elem, shape }
    }

    /// A type whose dimensions are all static.
    pub fn fixed(elem: ElemType, dims: &[usize]) -> Type {
        Type {
            elem,
            shape: dims.iter().map(|&d| Expr::lit(d as i64)).collect(),
        }
    }

    pub fn f32(shape: Vec<Expr>) -> Type {
        Type::new(ElemType::F32, shape)
    }

    /// The static dimensions, or `None` if one depends on a symbol.
    pub fn static_dims(&self) -> Option<Vec<usize>> {
        self.shape
            .iter()
            .map(|e| e.as_static().and_then(|n| usize::try_from(n).ok()))
            .collect()
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.elem.name())?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                write!(f, ",")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

/// What a constant is, which says who fills its data (see `needlec::lower::const_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConstKind {
    /// A checkpoint tensor, or one derived from checkpoint tensors by a pass.
    Weight,
    /// Tools-side K or V computed at build time (`--fold tools`).
    FoldedKv,
    /// RoPE cos/sin by position.
    RopeTable,
    /// Token ids fixed at build time (`<tools>` and the tool list's tokens).
    ToolTokens,
    // The tokenizer's and the grammar's tables are not IR constants: they serve the driver
    // around the model, and their generators read them from the runtime's tables directly.
}

impl ConstKind {
    pub const ALL: [ConstKind; 4] = [
        ConstKind::Weight,
        ConstKind::FoldedKv,
        ConstKind::RopeTable,
        ConstKind::ToolTokens,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ConstKind::Weight => "weight",
            ConstKind::FoldedKv => "folded_kv",
            ConstKind::RopeTable => "rope_table",
            ConstKind::ToolTokens => "tool_tokens",
        }
    }
}

/// How a constant's values are stored in the binary. The IR's ops always see the logical type;
/// codegen picks kernels by storage, so quantizing a weight never changes an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Storage {
    /// As the logical element type.
    Plain,
    /// IEEE half (binary16), widened to f32 on load: exact for values that are halves.
    F16,
    /// int8 with one f32 scale per `group` consecutive input rows and column of a matmul
    /// weight (the last group may be short: the reference pads it with zeros).
    I8 { group: u32 },
    /// int4, likewise.
    I4 { group: u32 },
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Storage::Plain => write!(f, "plain"),
            Storage::F16 => write!(f, "f16"),
            Storage::I8 { group } => write!(f, "i8g{group}"),
            Storage::I4 { group } => write!(f, "i4g{group}"),
        }
    }
}
