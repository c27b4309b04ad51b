//! The one error type of a module that is wrong where it stands: the verifier finds it by
//! reading the module, the interpreter by running it, and both say the same three things about
//! where (function, value, op) and what.

use std::fmt;

use crate::module::Inst;

/// What is wrong with a module (or with a call of one), and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct IrError {
    /// The function, when the problem is inside one.
    pub func: Option<String>,
    /// The value the failing instruction defines (without `%`), or, outside instructions, the
    /// declaration's name with its sigil (`@w`, `$cache`, `dim q`).
    pub value: Option<String>,
    /// The failing op's name.
    pub op: Option<&'static str>,
    pub message: String,
}

impl IrError {
    /// A problem with a module-level declaration (`what`: `@w`, `$cache`, `dim q`).
    pub fn module(what: impl Into<String>, message: impl Into<String>) -> IrError {
        IrError {
            func: None,
            value: Some(what.into()),
            op: None,
            message: message.into(),
        }
    }

    /// A problem inside function `func`, at `inst` when it is one instruction's.
    pub fn in_func(func: &str, inst: Option<&Inst>, message: impl Into<String>) -> IrError {
        IrError {
            func: Some(func.to_string()),
            value: inst.and_then(|i| i.result.as_ref()).map(|r| r.name.clone()),
            op: inst.map(|i| i.op.name()),
            message: message.into(),
        }
    }
}

impl fmt::Display for IrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.func {
            Some(func) => write!(f, "in @{func}")?,
            None => write!(f, "in the module")?,
        }
        match (&self.value, self.op) {
            (Some(v), Some(op)) => write!(f, ", %{v} = {op}")?,
            (None, Some(op)) => write!(f, ", {op}")?,
            (Some(v), None) => write!(f, ", {v}")?,
            (None, None) => {}
        }
        write!(f, ": {}", self.message)
    }
}
