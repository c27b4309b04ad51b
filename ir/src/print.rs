//! The text format's printer. Stable: the same module always prints the same bytes, and
//! [`crate::parse`] reads it back to an equal module.
//!
//! ```text
//! needle_ir v1
//! dim q in 0..=987
//! const @enc.0.q_proj : f32[64,64] weight plain
//! buffer $cross.0.k : f32[987,2,16]
//!
//! func @encode_query(%query: i32[q]) {
//!   %x = embed @embedding, %query, scale=8 : f32[q,64]
//!   store %c0.kn -> $cross.0.k[0..]
//!   return
//! }
//! ```

use std::fmt::Write;

use crate::module::{Function, Inst, Module, Op, Operand};

/// First line of every module; the parser rejects text without it.
pub const HEADER: &str = "needle_ir v1";

pub fn print(module: &Module) -> String {
    print_with(module, &NoNotes)
}

/// Comments an analysis adds to the text (`#` lines, which the parser skips): see
/// `crate::plan::print_planned`.
pub(crate) trait Notes {
    /// Lines right after the header.
    fn module(&self) -> Vec<String>;
    /// Lines at the top of a function's body.
    fn func(&self, f: &Function) -> Vec<String>;
    /// The end of instruction `i`'s line.
    fn inst(&self, f: &Function, i: usize) -> Option<String>;
}

struct NoNotes;

impl Notes for NoNotes {
    fn module(&self) -> Vec<String> {
        Vec::new()
    }
    fn func(&self, _: &Function) -> Vec<String> {
        Vec::new()
    }
    fn inst(&self, _: &Function, _: usize) -> Option<String> {
        None
    }
}

pub(crate) fn print_with(module: &Module, notes: &dyn Notes) -> String {
    let mut out = String::new();
    out.push_str(HEADER);
    out.push('\n');
    for line in notes.module() {
        let _ = writeln!(out, "# {line}");
    }
    for d in &module.dims {
        let _ = writeln!(out, "dim {} in {}..={}", d.sym.name(), d.min, d.max);
    }
    if !module.consts.is_empty() {
        out.push('\n');
    }
    for c in &module.consts {
        let _ = writeln!(
            out,
            "const @{} : {} {} {}",
            c.name,
            c.ty,
            c.kind.name(),
            c.storage
        );
    }
    if !module.buffers.is_empty() {
        out.push('\n');
    }
    for b in &module.buffers {
        let _ = writeln!(out, "buffer ${} : {}", b.name, b.ty);
    }
    for f in &module.funcs {
        out.push('\n');
        print_function(&mut out, f, notes);
    }
    out
}

fn print_function(out: &mut String, f: &Function, notes: &dyn Notes) {
    let params: Vec<String> = f
        .params
        .iter()
        .map(|p| format!("%{}: {}", p.name, p.ty))
        .collect();
    let _ = writeln!(out, "func @{}({}) {{", f.name, params.join(", "));
    for line in notes.func(f) {
        let _ = writeln!(out, "  # {line}");
    }
    for (i, inst) in f.body.iter().enumerate() {
        out.push_str("  ");
        out.push_str(&print_inst(inst));
        if let Some(note) = notes.inst(f, i) {
            let _ = write!(out, "  # {note}");
        }
        out.push('\n');
    }
    let results: Vec<String> = f.results.iter().map(|r| format!("%{r}")).collect();
    if results.is_empty() {
        out.push_str("  return\n");
    } else {
        let _ = writeln!(out, "  return {}", results.join(", "));
    }
    out.push_str("}\n");
}

/// One instruction, without indentation or newline (also used in verifier messages).
pub fn print_inst(inst: &Inst) -> String {
    let op = print_op(&inst.op);
    match &inst.result {
        Some(r) => format!("%{} = {op} : {}", r.name, r.ty),
        None => op,
    }
}

fn print_op(op: &Op) -> String {
    let name = op.name();
    match op {
        Op::Embed { table, ids, scale } => format!("{name} @{table}, %{ids}, scale={scale:?}"),
        Op::Concat { parts } => {
            let parts: Vec<String> = parts.iter().map(operand).collect();
            format!("{name} {}", parts.join(", "))
        }
        Op::MatMul { x, w } => format!("{name} %{x}, @{w}"),
        Op::Reshape { x } => format!("{name} %{x}"),
        Op::ZcRmsNorm { x, scale } => format!("{name} %{x}, @{scale}"),
        Op::RmsNorm { x, scale: Some(s) } => format!("{name} %{x}, @{s}"),
        Op::RmsNorm { x, scale: None } => format!("{name} %{x}"),
        Op::Rope { x, table, start } => format!("{name} %{x}, @{table}, start={start}"),
        Op::Attention { q, kv } => {
            let blocks: Vec<String> = kv
                .iter()
                .map(|(k, v)| format!("({}, {})", operand(k), operand(v)))
                .collect();
            format!("{name} %{q}, {}", blocks.join(", "))
        }
        Op::Store { value, buffer, at } => format!("{name} %{value} -> ${buffer}[{at}..]"),
        Op::GatedResidual { x, y, gate } => format!("{name} %{x}, %{y}, @{gate}"),
        Op::Residual { x, y, scale } => format!("{name} %{x}, %{y}, @{scale}"),
        Op::Logits { x, table } => format!("{name} %{x}, @{table}"),
        Op::ArgmaxMasked { logits, allowed } => format!("{name} %{logits}, %{allowed}"),
    }
}

fn operand(o: &Operand) -> String {
    match o {
        Operand::Value(v) => format!("%{v}"),
        Operand::Const(c) => format!("@{c}"),
        Operand::Buffer { name, len } => format!("${name}[..{len}]"),
    }
}

#[cfg(test)]
mod tests {
    use crate::test_sample::SAMPLE;
    use crate::types::{Expr, Sym};
    use crate::{parse, print, verify};

    #[test]
    fn sample_round_trips_byte_for_byte() {
        let m = parse(SAMPLE).unwrap();
        verify(&m).unwrap();
        assert_eq!(print(&m), SAMPLE);
        assert_eq!(parse(&print(&m)).unwrap(), m);
    }

    #[test]
    fn expressions_print_canonically_and_read_back() {
        let e = |q, p, offset| Expr { q, p, a: 0, offset };
        let cases = [
            (e(0, 0, 0), "0"),
            (e(0, 0, -4), "-4"),
            (e(1, 0, 0), "q"),
            (e(1, 0, 37), "q+37"),
            (e(-1, 0, 987), "987-q"),
            (e(-1, 0, 0), "-q"),
            (e(0, 1, 1), "p+1"),
            (e(2, -1, -3), "2*q-p-3"),
            (e(-3, 1, 5), "5-3*q+p"),
        ];
        for (expr, text) in cases {
            assert_eq!(expr.to_string(), text);
            let module =
                format!("needle_ir v1 dim q in 0..=1 dim p in 0..=1 buffer $b : f32[{text}]");
            assert_eq!(
                parse(&module).unwrap().buffers[0].ty.shape,
                vec![expr],
                "{text}"
            );
        }
        assert_eq!(Expr::sym(Sym::Q).range(|_| (0, 9)), (0, 9));
        assert_eq!(e(-1, 0, 987).range(|_| (0, 987)), (0, 987));
    }

    #[test]
    fn float_attributes_round_trip_exactly() {
        for scale in [8.0f32, 512f32.sqrt(), 1e-7, -0.0, 3.4e38] {
            let text = SAMPLE.replacen("scale=2.828427", &format!("scale={scale:?}"), 1);
            let m = parse(&text).unwrap();
            let crate::Op::Embed { scale: got, .. } = &m.funcs[0].body[1].op else {
                panic!()
            };
            assert_eq!(got.to_bits(), scale.to_bits());
            assert_eq!(print(&m), text);
        }
    }
}
