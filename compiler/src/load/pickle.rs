//! A pickle reader for Needle checkpoints: a small stack machine that understands the opcodes
//! Python (protocols 2 to 5) and numpy emit for a dict of dicts of arrays, and nothing more.
//!
//! The file is untrusted. Nothing is ever executed: GLOBAL only resolves names on a short
//! allow-list of numpy constructors that are interpreted here (a reconstructed array is data, not
//! a call), and any other name is refused. Every length is checked against the remaining input
//! before anything is allocated, and the only recursion (converting the result) is depth-limited,
//! so a hostile or corrupt file yields a [`LoadError`], never a panic or an unbounded allocation.
//!
//! Supported array encodings:
//! - `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` + BUILD with the state
//!   `(version, shape, dtype, is_fortran, raw)` (or the old 4-tuple without version);
//! - `numpy.core.numeric._frombuffer(buf, dtype, shape, order)` (protocol 5, in-band buffer);
//! - `numpy.core.multiarray.scalar(dtype, raw)` numpy scalars, loaded as 0-d tensors;
//!
//! each under `numpy.core.*` (numpy 1.x) or `numpy._core.*` (numpy 2.x). Dtypes are
//! `numpy.dtype('f2' | 'f4', ...)` with byte order `<`, `>`, `|` or `=` from their BUILD state.
//! bfloat16 arrays, which numpy can hold only through the `ml_dtypes` extension, arrive as
//! `numpy.dtype(ml_dtypes.bfloat16, ...)`: the class is accepted (from `ml_dtypes` or
//! `ml_dtypes._ml_dtypes_ext`) as a dtype marker and never imported. Big-endian data is
//! byte-swapped and Fortran-ordered data transposed, so tensors come out little-endian row-major.

use std::collections::{BTreeMap, HashMap};

use needle_runtime::checkpoint::{DType, Tensor};

use super::LoadError;

/// Nesting limit for dicts in the result (the real files nest 5 deep).
const MAX_DEPTH: usize = 64;

/// A value on the stack or in the memo: scalars inline, everything else a handle into the heap,
/// so that DUP, GET and memoizing never copy tensor bytes and mutation (SETITEM on a memoized
/// dict) is seen through every handle, as in Python.
#[derive(Clone, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside i64 (LONG1/LONG4): harmless until something needs its value.
    BigInt,
    Float(f64),
    Obj(usize),
}

#[derive(Debug)]
enum Obj {
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Insertion-ordered; a repeated key overwrites, as in Python.
    Dict(Vec<(Value, Value)>),
    Global(Global),
    /// `numpy.dtype(...)` before and after its BUILD.
    Dtype {
        dtype: Result<DType, String>,
        big_endian: bool,
    },
    /// `_reconstruct(ndarray, ...)` waiting for its BUILD state.
    EmptyArray,
    /// A finished array, or why it is not one. The problem is kept rather than raised so that the
    /// error can name the tensor's path, which is known only once the dicts are walked.
    Array {
        offset: usize,
        tensor: Result<Tensor, String>,
    },
}

/// The names a checkpoint may refer to: everything else is refused.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Global {
    Reconstruct,
    Ndarray,
    DtypeCtor,
    Scalar,
    FromBuffer,
    Bfloat16,
    CodecsEncode,
    OrderedDict,
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    let multiarray = matches!(module, "numpy.core.multiarray" | "numpy._core.multiarray");
    let numeric = matches!(module, "numpy.core.numeric" | "numpy._core.numeric");
    let numpy = module == "numpy" || multiarray || numeric;
    Some(match name {
        "_reconstruct" if multiarray => Global::Reconstruct,
        "scalar" if multiarray => Global::Scalar,
        "_frombuffer" if numeric || multiarray => Global::FromBuffer,
        "ndarray" if numpy => Global::Ndarray,
        "dtype" if numpy => Global::DtypeCtor,
        "bfloat16" if matches!(module, "ml_dtypes" | "ml_dtypes._ml_dtypes_ext") => {
            Global::Bfloat16
        }
        "encode" if module == "_codecs" => Global::CodecsEncode,
        "OrderedDict" if module == "collections" => Global::OrderedDict,
        _ => return None,
    })
}

/// The unpickled top level: plain data with arrays as leaves.
#[derive(Debug)]
pub(crate) enum PyData {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Anything else (bytes, tuples, lists, big integers): kept only as a description for errors.
    Other(String),
    Dict(Vec<(String, PyData)>),
    Array {
        offset: usize,
        tensor: Result<Tensor, String>,
    },
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u64, Value>,
    heap: Vec<Obj>,
    /// Offset of the opcode being executed, for error messages.
    op_at: usize,
}

fn err(offset: usize, problem: impl Into<String>) -> LoadError {
    LoadError::Pickle {
        offset,
        problem: problem.into(),
    }
}

impl<'a> Machine<'a> {
    fn truncated(&self, what: &str) -> LoadError {
        LoadError::Truncated {
            offset: self.op_at,
            what: what.to_string(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LoadError> {
        let data: &'a [u8] = self.data;
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= data.len())
            .ok_or_else(|| self.truncated(what))?;
        let out = &data[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn byte(&mut self, what: &str) -> Result<u8, LoadError> {
        Ok(self.take(1, what)?[0])
    }

    fn le_uint(&mut self, n: usize, what: &str) -> Result<u64, LoadError> {
        let b = self.take(n, what)?;
        Ok(b.iter()
            .rev()
            .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    /// A length prefix, checked against the remaining input before anyone allocates from it.
    fn length(&mut self, n: usize, what: &str) -> Result<usize, LoadError> {
        let len = self.le_uint(n, what)?;
        let left = self.data.len() - self.pos;
        match usize::try_from(len) {
            Ok(l) if l <= left => Ok(l),
            _ => Err(LoadError::Truncated {
                offset: self.op_at,
                what: format!("{what}: declares {len} bytes but only {left} remain"),
            }),
        }
    }

    fn line(&mut self, what: &str) -> Result<&'a str, LoadError> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.truncated(what))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| err(self.op_at, format!("{what} is not UTF-8")))
    }

    fn alloc(&mut self, obj: Obj) -> Value {
        self.heap.push(obj);
        Value::Obj(self.heap.len() - 1)
    }

    fn push_obj(&mut self, obj: Obj) {
        let v = self.alloc(obj);
        self.stack.push(v);
    }

    fn pop(&mut self) -> Result<Value, LoadError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(err(
                self.op_at,
                "stack underflow: an opcode needs a value that is not there",
            ));
        }
        self.stack
            .pop()
            .ok_or_else(|| err(self.op_at, "stack underflow"))
    }

    fn top(&self) -> Result<&Value, LoadError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(err(
                self.op_at,
                "stack underflow: an opcode needs a value that is not there",
            ));
        }
        self.stack
            .last()
            .ok_or_else(|| err(self.op_at, "stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>, LoadError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| err(self.op_at, "no MARK on the stack for this opcode"))?;
        Ok(self.stack.split_off(mark.min(self.stack.len())))
    }

    fn obj(&self, v: &Value) -> Option<&Obj> {
        match v {
            Value::Obj(i) => self.heap.get(*i),
            _ => None,
        }
    }

    fn describe(&self, v: &Value) -> String {
        match v {
            Value::None => "None".into(),
            Value::Bool(b) => format!("bool {b}"),
            Value::Int(i) => format!("int {i}"),
            Value::BigInt => "a big integer".into(),
            Value::Float(f) => format!("float {f}"),
            Value::Obj(_) => match self.obj(v) {
                Some(Obj::Str(s)) if s.chars().count() > 60 => {
                    format!("a {}-character str", s.chars().count())
                }
                Some(Obj::Str(s)) => format!("str {s:?}"),
                Some(Obj::Bytes(b)) => format!("{} bytes", b.len()),
                Some(Obj::Tuple(t)) => format!("a tuple of {}", t.len()),
                Some(Obj::List(l)) => format!("a list of {}", l.len()),
                Some(Obj::Dict(_)) => "a dict".into(),
                Some(Obj::Global(g)) => format!("{g:?}"),
                Some(Obj::Dtype { .. }) => "a numpy dtype".into(),
                Some(Obj::EmptyArray) | Some(Obj::Array { .. }) => "a numpy array".into(),
                None => "a dangling reference".into(),
            },
        }
    }

    fn memo_put(&mut self, idx: u64) -> Result<(), LoadError> {
        let v = self.top()?.clone();
        self.memo.insert(idx, v);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<(), LoadError> {
        let v = self.memo.get(&idx).cloned().ok_or_else(|| {
            err(
                self.op_at,
                format!("memo entry {idx} is read before it was written: the file is corrupt"),
            )
        })?;
        self.stack.push(v);
        Ok(())
    }

    fn dict_set(&mut self, dict: &Value, pairs: Vec<Value>) -> Result<(), LoadError> {
        if pairs.len() % 2 == 1 {
            return Err(err(self.op_at, "SETITEMS with an odd number of values"));
        }
        let at = self.op_at;
        let items = match dict {
            Value::Obj(i) => match self.heap.get_mut(*i) {
                Some(Obj::Dict(items)) => items,
                _ => return Err(err(at, "SETITEM(S) on something that is not a dict")),
            },
            _ => return Err(err(at, "SETITEM(S) on something that is not a dict")),
        };
        // Repeated keys are resolved (last wins) when the dict is read, which keeps this linear.
        let mut it = pairs.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            items.push((k, v));
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Value, LoadError> {
        loop {
            self.op_at = self.pos;
            let op = self.byte("the next opcode (the file ends before STOP)")?;
            match op {
                0x80 => {
                    let proto = self.byte("PROTO's version")?;
                    if !(2..=5).contains(&proto) {
                        return Err(err(
                            self.op_at,
                            format!("pickle protocol {proto} is not supported (2 to 5 are): re-save with protocol 4"),
                        ));
                    }
                }
                0x95 => {
                    // Frames only group opcodes for buffered reading; the content is inline.
                    self.le_uint(8, "FRAME's length")?;
                }
                b'.' => return self.pop(),
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = self.le_uint(4, "BININT's value")? as u32 as i32;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'K' => {
                    let v = self.byte("BININT1's value")?;
                    self.stack.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = self.le_uint(2, "BININT2's value")?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.length(1, "LONG1's length")? } else { self.length(4, "LONG4's length")? };
                    let b = self.take(n, "the integer's bytes")?;
                    self.stack.push(long_value(b));
                }
                b'G' => {
                    let b = self.take(8, "BINFLOAT's value")?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.stack.push(Value::Float(f64::from_be_bytes(a)));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        0x8c => self.length(1, "the string's length")?,
                        b'X' => self.length(4, "the string's length")?,
                        _ => self.length(8, "the string's length")?,
                    };
                    let b = self.take(n, "the string")?;
                    let s = std::str::from_utf8(b).map_err(|_| err(self.op_at, "a string is not valid UTF-8"))?;
                    self.push_obj(Obj::Str(s.to_string()));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'C' => self.length(1, "the bytes' length")?,
                        b'B' => self.length(4, "the bytes' length")?,
                        _ => self.length(8, "the bytes' length")?,
                    };
                    let b = self.take(n, "the bytes")?.to_vec();
                    self.push_obj(Obj::Bytes(b));
                }
                0x98 => {
                    // READONLY_BUFFER only flags the buffer on top of the stack.
                    self.top()?;
                }
                0x97 => {
                    return Err(err(
                        self.op_at,
                        "the pickle refers to an out-of-band buffer (protocol 5 `buffer_callback`), which \
                         is not in the file: re-save with the buffers in-band (plain `pickle.dump`)",
                    ))
                }
                b')' => self.push_obj(Obj::Tuple(Vec::new())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::Tuple(items));
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push_obj(Obj::Tuple(items));
                }
                b']' => self.push_obj(Obj::List(Vec::new())),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push_obj(Obj::List(items));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' { vec![self.pop()?] } else { self.pop_mark()? };
                    let list = self.top()?.clone();
                    let at = self.op_at;
                    match list {
                        Value::Obj(i) => match self.heap.get_mut(i) {
                            Some(Obj::List(l)) => l.extend(items),
                            _ => return Err(err(at, "APPEND(S) on something that is not a list")),
                        },
                        _ => return Err(err(at, "APPEND(S) on something that is not a list")),
                    }
                }
                b'}' => self.push_obj(Obj::Dict(Vec::new())),
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = self.alloc(Obj::Dict(Vec::new()));
                    self.dict_set(&d, items)?;
                    self.stack.push(d);
                }
                b's' | b'u' => {
                    let items = if op == b's' {
                        let v = self.pop()?;
                        let k = self.pop()?;
                        vec![k, v]
                    } else {
                        self.pop_mark()?
                    };
                    let d = self.top()?.clone();
                    self.dict_set(&d, items)?;
                }
                b'c' => {
                    let module = self.line("GLOBAL's module")?;
                    let name = self.line("GLOBAL's name")?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Some(Obj::Str(m)), Some(Obj::Str(n))) = (self.obj(&module), self.obj(&name)) else {
                        return Err(err(self.op_at, "STACK_GLOBAL needs two strings (module, name)"));
                    };
                    let (m, n) = (m.clone(), n.clone());
                    self.global(&m, &n)?;
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(&callable, &args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    let v = self.reduce(&cls, &args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    let target = self.top()?.clone();
                    self.build(&target, &state)?;
                }
                b'p' => {
                    let idx = self.line("PUT's index")?;
                    let idx = idx.trim().parse().map_err(|_| err(self.op_at, "PUT's index is not a number"))?;
                    self.memo_put(idx)?;
                }
                b'g' => {
                    let idx = self.line("GET's index")?;
                    let idx = idx.trim().parse().map_err(|_| err(self.op_at, "GET's index is not a number"))?;
                    self.memo_get(idx)?;
                }
                b'q' => {
                    let idx = self.le_uint(1, "BINPUT's index")?;
                    self.memo_put(idx)?;
                }
                b'r' => {
                    let idx = self.le_uint(4, "LONG_BINPUT's index")?;
                    self.memo_put(idx)?;
                }
                0x94 => {
                    let idx = self.memo.len() as u64;
                    self.memo_put(idx)?;
                }
                b'h' => {
                    let idx = self.le_uint(1, "BINGET's index")?;
                    self.memo_get(idx)?;
                }
                b'j' => {
                    let idx = self.le_uint(4, "LONG_BINGET's index")?;
                    self.memo_get(idx)?;
                }
                _ => {
                    let what = match op {
                        b'I' | b'L' | b'F' | b'S' | b'V' | b'T' | b'U' | b'P' | b'Q' | b'i' | b'o' | 0x82..=0x84
                        | 0x8f..=0x92 => "a valid opcode that Needle checkpoints never contain",
                        _ => "not a pickle opcode",
                    };
                    return Err(err(
                        self.op_at,
                        format!(
                            "opcode 0x{op:02x} ({:?}) is {what}: the file is corrupt, or not a checkpoint written \
                             by the Needle reference",
                            char::from(op)
                        ),
                    ));
                }
            }
        }
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), LoadError> {
        let g = resolve_global(module, name).ok_or_else(|| LoadError::ForbiddenGlobal {
            offset: self.op_at,
            name: format!("{module}.{name}"),
        })?;
        self.push_obj(Obj::Global(g));
        Ok(())
    }

    /// The first few items of a tuple: every consumer needs at most 8, and copying no more keeps
    /// a file that REDUCEs one huge tuple many times from costing quadratic time.
    fn tuple_items(&self, v: &Value, what: &str) -> Result<Vec<Value>, LoadError> {
        match self.obj(v) {
            Some(Obj::Tuple(t)) | Some(Obj::List(t)) => Ok(t.iter().take(8).cloned().collect()),
            _ => Err(err(
                self.op_at,
                format!("{what} must be a tuple, found {}", self.describe(v)),
            )),
        }
    }

    fn reduce(&mut self, callable: &Value, args: &Value) -> Result<Value, LoadError> {
        let Some(Obj::Global(g)) = self.obj(callable) else {
            return Err(err(
                self.op_at,
                format!(
                    "REDUCE calls {}, which is not callable",
                    self.describe(callable)
                ),
            ));
        };
        let g = *g;
        let args = self.tuple_items(args, "the call's arguments")?;
        let obj = match g {
            Global::Reconstruct => {
                match args.first().and_then(|a| self.obj(a)) {
                    Some(Obj::Global(Global::Ndarray)) => {}
                    _ => {
                        return Err(err(
                            self.op_at,
                            "_reconstruct of something other than numpy.ndarray",
                        ))
                    }
                }
                Obj::EmptyArray
            }
            Global::DtypeCtor => {
                let dtype = match args.first() {
                    Some(a) => match self.obj(a) {
                        Some(Obj::Str(s)) => dtype_from_descr(s),
                        Some(Obj::Global(Global::Bfloat16)) => Ok(DType::BF16),
                        _ => Err(format!("numpy.dtype({})", self.describe(a))),
                    },
                    None => Err("numpy.dtype() without arguments".into()),
                };
                // The byte order comes in the BUILD state; until then numpy's default is native.
                Obj::Dtype {
                    dtype,
                    big_endian: false,
                }
            }
            Global::Scalar => {
                let (Some(dt), Some(raw)) = (args.first(), args.get(1)) else {
                    return Err(err(self.op_at, "numpy scalar() needs (dtype, bytes)"));
                };
                let tensor = self
                    .dtype_of(dt)
                    .and_then(|(dtype, be)| match self.obj(raw) {
                        Some(Obj::Bytes(b)) => make_tensor(dtype, be, vec![], false, b),
                        _ => Err(format!(
                            "the scalar's data is {}, not bytes",
                            self.describe(raw)
                        )),
                    });
                Obj::Array {
                    offset: self.op_at,
                    tensor,
                }
            }
            Global::FromBuffer => {
                let tensor = self.frombuffer_array(&args);
                Obj::Array {
                    offset: self.op_at,
                    tensor,
                }
            }
            Global::CodecsEncode => {
                // Protocol 2 stores bytes as `_codecs.encode(text, 'latin1')`.
                let text = match args.first().and_then(|a| self.obj(a)) {
                    Some(Obj::Str(s)) => s.clone(),
                    _ => return Err(err(self.op_at, "_codecs.encode needs a string")),
                };
                let enc = match args.get(1).and_then(|a| self.obj(a)) {
                    Some(Obj::Str(s)) => s.to_ascii_lowercase(),
                    _ => "utf-8".into(),
                };
                if enc != "latin1" && enc != "latin-1" && enc != "iso-8859-1" {
                    return Err(err(
                        self.op_at,
                        format!(
                            "_codecs.encode with encoding {enc:?} (only latin1 is used for bytes)"
                        ),
                    ));
                }
                let mut out = Vec::with_capacity(text.len());
                for ch in text.chars() {
                    let c = u32::from(ch);
                    if c > 0xff {
                        return Err(err(
                            self.op_at,
                            "latin1-encoded bytes contain a character above U+00FF",
                        ));
                    }
                    out.push(c as u8);
                }
                Obj::Bytes(out)
            }
            Global::OrderedDict => Obj::Dict(Vec::new()),
            Global::Ndarray | Global::Bfloat16 => {
                return Err(err(
                    self.op_at,
                    format!("{g:?} is not called directly by numpy's pickles"),
                ))
            }
        };
        Ok(self.alloc(obj))
    }

    fn dtype_of(&self, v: &Value) -> Result<(DType, bool), String> {
        match self.obj(v) {
            Some(Obj::Dtype { dtype, big_endian }) => dtype.clone().map(|d| (d, *big_endian)),
            _ => Err(format!(
                "expected a numpy dtype, found {}",
                self.describe(v)
            )),
        }
    }

    fn shape_of(&self, v: &Value) -> Result<Vec<usize>, String> {
        let items = match self.obj(v) {
            Some(Obj::Tuple(t)) | Some(Obj::List(t)) => t,
            _ => return Err(format!("the shape is {}, not a tuple", self.describe(v))),
        };
        items
            .iter()
            .map(|d| match d {
                Value::Int(i) => usize::try_from(*i).map_err(|_| format!("negative dimension {i}")),
                other => Err(format!("a dimension is {}", self.describe(other))),
            })
            .collect()
    }

    fn frombuffer_array(&self, args: &[Value]) -> Result<Tensor, String> {
        let [buf, dt, shape, order, ..] = args else {
            return Err("_frombuffer needs (buffer, dtype, shape, order)".into());
        };
        let (dtype, be) = self.dtype_of(dt)?;
        let shape = self.shape_of(shape)?;
        let fortran = match self.obj(order) {
            Some(Obj::Str(s)) if s == "F" => true,
            Some(Obj::Str(s)) if s == "C" || s == "A" || s == "K" => false,
            _ => return Err(format!("order {} is not 'C' or 'F'", self.describe(order))),
        };
        match self.obj(buf) {
            Some(Obj::Bytes(b)) => make_tensor(dtype, be, shape, fortran, b),
            _ => Err(format!("the buffer is {}, not bytes", self.describe(buf))),
        }
    }

    fn build(&mut self, target: &Value, state: &Value) -> Result<(), LoadError> {
        let at = self.op_at;
        let idx = match target {
            Value::Obj(i) => *i,
            _ => return Err(err(at, format!("BUILD on {}", self.describe(target)))),
        };
        let new = match self.heap.get(idx) {
            Some(Obj::Dtype { dtype, .. }) => {
                let items = self.tuple_items(state, "a dtype's state")?;
                // (version, byteorder, subarray, names, fields, elsize, alignment, flags)
                let order = match items.get(1).and_then(|v| self.obj(v)) {
                    Some(Obj::Str(s)) => s.clone(),
                    _ => return Err(err(at, "a dtype's state has no byte order")),
                };
                let big_endian = match order.as_str() {
                    "<" | "|" | "=" => false,
                    ">" => true,
                    other => {
                        return Err(err(at, format!("unknown byte order {other:?} in a dtype")))
                    }
                };
                Obj::Dtype {
                    dtype: dtype.clone(),
                    big_endian,
                }
            }
            Some(Obj::EmptyArray) => {
                let tensor = self.array_state(state);
                Obj::Array { offset: at, tensor }
            }
            Some(Obj::Dict(_)) => {
                // `__dict__` updates (OrderedDict's state is None): merge a dict state as Python does.
                if let Some(Obj::Dict(pairs)) = self.obj(state) {
                    let flat: Vec<Value> = pairs
                        .iter()
                        .flat_map(|(k, v)| [k.clone(), v.clone()])
                        .collect();
                    self.dict_set(target, flat)?;
                } else if !matches!(state, Value::None) {
                    return Err(err(
                        at,
                        format!("BUILD of a dict with {}", self.describe(state)),
                    ));
                }
                return Ok(());
            }
            _ => {
                return Err(err(
                    at,
                    format!("BUILD on {}, which takes no state", self.describe(target)),
                ))
            }
        };
        self.heap[idx] = new;
        Ok(())
    }

    /// `ndarray.__setstate__`: `(version, shape, dtype, is_fortran, raw)` or the 4-tuple without
    /// version.
    fn array_state(&self, state: &Value) -> Result<Tensor, String> {
        let items = match self.obj(state) {
            Some(Obj::Tuple(t)) => t.as_slice(),
            _ => {
                return Err(format!(
                    "the array state is {}, not a tuple",
                    self.describe(state)
                ))
            }
        };
        let items = match items.len() {
            5 => &items[1..],
            4 => items,
            n => return Err(format!("the array state has {n} items (numpy writes 5)")),
        };
        let shape = self.shape_of(&items[0])?;
        let (dtype, be) = self.dtype_of(&items[1])?;
        let fortran = match items[2] {
            Value::Bool(b) => b,
            Value::Int(i) => i != 0,
            ref other => return Err(format!("is_fortran is {}", self.describe(other))),
        };
        match self.obj(&items[3]) {
            Some(Obj::Bytes(b)) => make_tensor(dtype, be, shape, fortran, b),
            _ => Err(format!(
                "the array data is {}, not raw bytes (object arrays are not supported)",
                self.describe(&items[3])
            )),
        }
    }

    /// Converts the result to owned data. Arrays are moved out, not copied, and a budget bounds
    /// the work: memo references can make a small file describe an exponentially large tree
    /// (the same dict or string reached many times), which a real checkpoint never does.
    fn take_data(
        &mut self,
        v: &Value,
        depth: usize,
        budget: &mut usize,
    ) -> Result<PyData, LoadError> {
        if depth > MAX_DEPTH {
            return Err(err(
                self.op_at,
                format!("dicts nest more than {MAX_DEPTH} deep (or refer to themselves)"),
            ));
        }
        let cost = match self.obj(v) {
            Some(Obj::Str(s)) => 1 + s.len(),
            _ => 1,
        };
        *budget = budget.checked_sub(cost).ok_or_else(|| {
            err(
                self.op_at,
                "the pickle refers to the same objects over and over (a memo bomb?): not a checkpoint",
            )
        })?;
        let Value::Obj(i) = v else {
            return Ok(match v {
                Value::None => PyData::None,
                Value::Bool(b) => PyData::Bool(*b),
                Value::Int(i) => PyData::Int(*i),
                Value::Float(f) => PyData::Float(*f),
                _ => PyData::Other("an integer too large for 64 bits".into()),
            });
        };
        Ok(match self.heap.get_mut(*i) {
            Some(Obj::Array { offset, tensor }) => {
                let taken = std::mem::replace(
                    tensor,
                    Err(
                        "the same array object appears twice in the checkpoint; store each tensor \
                         separately"
                            .into(),
                    ),
                );
                PyData::Array {
                    offset: *offset,
                    tensor: taken,
                }
            }
            Some(Obj::Dict(items)) => {
                let items = items.clone();
                let mut out: Vec<(String, PyData)> = Vec::with_capacity(items.len());
                let mut seen: HashMap<String, usize> = HashMap::new();
                for (k, val) in &items {
                    let key = match (self.obj(k), k) {
                        (Some(Obj::Str(s)), _) => s.clone(),
                        (_, Value::Int(i)) => i.to_string(),
                        _ => {
                            return Err(err(
                                self.op_at,
                                format!("a dict key is {}, not a string", self.describe(k)),
                            ))
                        }
                    };
                    let val = self.take_data(val, depth + 1, budget)?;
                    // Python keeps the first position and the last value of a repeated key.
                    match seen.get(&key) {
                        Some(&p) => out[p].1 = val,
                        None => {
                            seen.insert(key.clone(), out.len());
                            out.push((key, val));
                        }
                    }
                }
                PyData::Dict(out)
            }
            Some(Obj::Str(s)) => PyData::Str(s.clone()),
            Some(Obj::EmptyArray) => PyData::Array {
                offset: self.op_at,
                tensor: Err("the array was never given its data (no BUILD)".into()),
            },
            _ => PyData::Other(self.describe(v)),
        })
    }
}

fn long_value(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() > 8 {
        let sign_fill = if b[b.len() - 1] & 0x80 != 0 { 0xff } else { 0 };
        if b[8..].iter().any(|&x| x != sign_fill) {
            return Value::BigInt;
        }
    }
    let n = b.len().min(8);
    let neg = b[b.len() - 1] & 0x80 != 0;
    let mut a = if neg { [0xffu8; 8] } else { [0u8; 8] };
    a[..n].copy_from_slice(&b[..n]);
    let v = i64::from_le_bytes(a);
    // A >8-byte encoding whose low 8 bytes flip the sign does not fit i64.
    if b.len() > 8 && (v < 0) != neg {
        return Value::BigInt;
    }
    Value::Int(v)
}

fn dtype_from_descr(s: &str) -> Result<DType, String> {
    let s = s.trim_start_matches(['<', '>', '|', '=']);
    match s {
        "f2" | "e" | "float16" => Ok(DType::F16),
        "f4" | "f" | "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        "f8" | "d" | "float64" => Err(
            "dtype float64 is not supported (float16, bfloat16 and float32 are): convert the arrays with \
             `.astype(np.float32)` and re-save"
                .into(),
        ),
        "V2" => Err("dtype V2 (2 raw bytes) is ambiguous: save bfloat16 arrays with ml_dtypes.bfloat16".into()),
        other => Err(format!("dtype {other:?} is not supported (float16, bfloat16 and float32 are)")),
    }
}

/// Builds a little-endian row-major tensor from numpy's raw bytes.
fn make_tensor(
    dtype: DType,
    big_endian: bool,
    shape: Vec<usize>,
    fortran: bool,
    raw: &[u8],
) -> Result<Tensor, String> {
    let size = dtype.size();
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let want = numel.and_then(|n| n.checked_mul(size));
    if want != Some(raw.len()) {
        return Err(format!(
            "shape {shape:?} of {} needs {} bytes but the array holds {}",
            dtype.name(),
            want.map_or_else(|| "more than 2^64".to_string(), |w| w.to_string()),
            raw.len()
        ));
    }
    let mut bytes = raw.to_vec();
    if big_endian {
        for el in bytes.chunks_exact_mut(size) {
            el.reverse();
        }
    }
    if fortran && shape.len() > 1 {
        bytes = fortran_to_c(&bytes, &shape, size);
    }
    Ok(Tensor {
        dtype,
        shape,
        bytes,
    })
}

/// Reorders column-major element data to row-major.
fn fortran_to_c(src: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let n = shape.len();
    // Element strides of the Fortran layout: the first axis varies fastest.
    if src.is_empty() {
        // A zero-sized axis: nothing to move, and the strides below could overflow.
        return Vec::new();
    }
    let mut fstride = vec![1usize; n];
    for k in 1..n {
        fstride[k] = fstride[k - 1] * shape[k - 1];
    }
    let mut out = Vec::with_capacity(src.len());
    let mut idx = vec![0usize; n];
    let total = src.len() / size;
    for _ in 0..total {
        let f: usize = idx.iter().zip(&fstride).map(|(i, s)| i * s).sum();
        out.extend_from_slice(&src[f * size..(f + 1) * size]);
        // Advance the row-major index: the last axis varies fastest.
        for k in (0..n).rev() {
            idx[k] += 1;
            if idx[k] < shape[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

/// Runs the pickle and returns its top-level object as plain data.
pub(crate) fn unpickle(data: &[u8]) -> Result<PyData, LoadError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        heap: Vec::new(),
        op_at: 0,
    };
    let top = m.run()?;
    let mut budget = data.len().saturating_mul(4).saturating_add(4096);
    m.take_data(&top, 0, &mut budget)
}

/// Flattens nested dicts of arrays into `/`-joined paths.
pub(crate) fn flatten_params(params: PyData) -> Result<BTreeMap<String, Tensor>, LoadError> {
    fn walk(prefix: &str, d: PyData, out: &mut BTreeMap<String, Tensor>) -> Result<(), LoadError> {
        match d {
            PyData::Dict(items) => {
                for (k, v) in items {
                    if k.is_empty() || k.contains('/') {
                        return Err(LoadError::Structure {
                            problem: format!(
                                "params key {k:?} under {prefix:?} is empty or contains `/`"
                            ),
                        });
                    }
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}/{k}")
                    };
                    if out.contains_key(&path) {
                        return Err(LoadError::Structure {
                            problem: format!("params path `{path}` appears twice"),
                        });
                    }
                    walk(&path, v, out)?;
                }
                Ok(())
            }
            PyData::Array { offset, tensor } => match tensor {
                Ok(t) => {
                    out.insert(prefix.to_string(), t);
                    Ok(())
                }
                Err(problem) => Err(LoadError::BadArray {
                    path: prefix.to_string(),
                    offset,
                    problem,
                }),
            },
            other => Err(LoadError::Structure {
                problem: format!(
                    "params entry `{prefix}` is {}, not an array or a dict of arrays",
                    other.kind()
                ),
            }),
        }
    }
    let mut out = BTreeMap::new();
    match params {
        PyData::Dict(_) => walk("", params, &mut out)?,
        other => {
            return Err(LoadError::Structure {
                problem: format!("`params` is {}, not a dict of arrays", other.kind()),
            })
        }
    }
    Ok(out)
}

impl PyData {
    pub(crate) fn kind(&self) -> String {
        match self {
            PyData::None => "None".into(),
            PyData::Bool(b) => format!("the bool {}", if *b { "True" } else { "False" }),
            PyData::Int(i) => format!("the int {i}"),
            PyData::Float(f) => format!("the float {f}"),
            PyData::Str(s) => format!("the string {s:?}"),
            PyData::Other(s) => s.clone(),
            PyData::Dict(_) => "a dict".into(),
            PyData::Array { .. } => "an array".into(),
        }
    }

    /// Converts a config value to JSON for serde; `None` when JSON cannot hold it.
    pub(crate) fn to_json(&self) -> Option<serde_json::Value> {
        use serde_json::Value as J;
        Some(match self {
            PyData::None => J::Null,
            PyData::Bool(b) => J::Bool(*b),
            PyData::Int(i) => J::from(*i),
            PyData::Float(f) => J::Number(serde_json::Number::from_f64(*f)?),
            PyData::Str(s) => J::String(s.clone()),
            PyData::Array { tensor: Ok(t), .. } if t.shape.is_empty() => {
                // A numpy scalar in the config (e.g. np.float32(10000.0)).
                J::Number(serde_json::Number::from_f64(f64::from(
                    *t.to_f32().first()?,
                ))?)
            }
            _ => return None,
        })
    }
}
