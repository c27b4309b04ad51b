//! One whole library: the model, tokenizer, grammar and output code plus the driver, generated
//! into one object, and the C header that describes its interface.

use needle_ir::{ConstStore, Module};
use needle_runtime::config::Config;
use needle_runtime::decode::FoldMode;
use needle_runtime::grammar::GrammarTables;
use needle_runtime::strict::StrictTables;
use needle_runtime::tokenizer::Tokenizer;
use needle_targets::Target;

use super::driver::{
    define_driver, DriverLimits, LibraryInfo, Parts, INFO_FIELDS, INFO_FLOAT_FIELDS, RESULT_FIELDS,
    STATUSES, WORKSPACE_ALIGN,
};
use super::grammar::define_grammar;
use super::model::define_model;
use super::output::define_output;
use super::rust_binding::{rust_binding, BindingFacts};
use super::strict::define_strict_grammar;
use super::tokenizer::define_tokenizer;
use super::{CodegenError, KernelSet};
use crate::abi::write_header;

/// The longest query, in bytes, the library accepts: enough for far more than the 1022 tokens
/// the model reads, and what the tokenizer's scratch is planned for.
pub const MAX_QUERY_BYTES: usize = 16384;

/// A generated library before archiving.
pub struct Library {
    pub object: Vec<u8>,
    pub header: String,
    /// `NAME.rs`: the Rust binding ([`super::rust_binding`]).
    pub binding: String,
    pub info: LibraryInfo,
}

/// The ABI version reported by `NAME_model_info`; bump it when the C interface changes.
/// 2: `NAME_call_ex` and `NAME_result`; `NAME_info` grew `escalate_below` (at the end, so the
/// fields before it keep their offsets).
/// 3: `NAME_result` grew `parsed` (after `tool`; `choice_steps` moved from offset 12 to 16).
pub const ABI_VERSION: u32 = 3;

/// Everything a library is generated from: the optimized program with its constants' data, and
/// the tokenizer and tool list the tokenizer, grammar and output code are built for.
pub struct LibraryInput<'a> {
    /// The module after the whole pass pipeline.
    pub module: &'a Module,
    /// The data of every constant `module` declares.
    pub store: &'a ConstStore,
    pub fold: FoldMode,
    pub config: &'a Config,
    pub tokenizer: &'a Tokenizer,
    /// `(snake_case name, parameter keys)` per tool, in tool order: what the grammar constrains.
    pub signatures: &'a [(String, Vec<String>)],
    /// `(snake_case name, original name)` per tool, in tool order: what the output restores.
    pub name_map: &'a [(String, String)],
    /// Prefix of every symbol (with `_`) and macro: a C identifier.
    pub name: &'a str,
    /// At most `max_gen_len - 1` generated tokens.
    pub max_gen_len: usize,
    /// `NAME_call_ex` escalates below this confidence (0: never); in `[0, 1]`.
    pub escalate_below: f32,
    /// `--quantize-activations`: int8/int4 matrix products on quantized activations
    /// (opt-in; the outputs may differ from the reference's).
    pub quantize_activations: bool,
    /// The most forced tokens one multi-row decoder step takes (below 2: none).
    pub max_forced_rows: usize,
    /// The strict grammar's tables (`--grammar strict`); `None`: the reference grammar.
    pub strict: Option<&'a StrictTables>,
}

/// Generates the library for `target`; every symbol starts with `input.name` and `_`.
pub fn generate(input: &LibraryInput<'_>, target: &Target) -> Result<Library, CodegenError> {
    let &LibraryInput {
        tokenizer,
        name,
        max_gen_len,
        ..
    } = input;
    let prefix = format!("{name}_");
    let mut ks = KernelSet::new(target, &prefix)?;
    ks.set_quantize_activations(input.quantize_activations);
    let model = define_model(
        &mut ks,
        input.module,
        input.store,
        false,
        input.max_forced_rows,
    )?;
    let tokenizer_code = define_tokenizer(&mut ks, tokenizer, MAX_QUERY_BYTES, false)?;
    let grammar = match input.strict {
        None => {
            let tables = GrammarTables::new(&tokenizer.token_texts(), input.signatures);
            define_grammar(&mut ks, &tables, false)?
        }
        Some(tables) => define_strict_grammar(&mut ks, tables, false)?,
    };
    // Detokenized text is never longer than the generated pieces' own bytes.
    let max_piece = (0..tokenizer.vocab_size() as u32)
        .filter_map(|id| tokenizer.piece(id))
        .map(str::len)
        .max();
    let max_text = (max_gen_len - 1) * max_piece.unwrap_or(1).max(1);
    let output = define_output(&mut ks, tokenizer, input.name_map, max_text, false)?;
    let parts = Parts {
        model: &model,
        tokenizer: &tokenizer_code,
        grammar: &grammar,
        output: &output,
    };
    let limits = DriverLimits {
        max_query_bytes: MAX_QUERY_BYTES,
        refuse_long_queries: input.fold == FoldMode::None
            && model.max_query_tokens < needle_runtime::decode::MAX_QUERY_TOKENS,
        max_gen_len,
        vocab_size: input.config.vocab_size,
        escalate_below: input.escalate_below,
    };
    let c = input.config;
    let mut values = vec![
        ABI_VERSION,
        c.vocab_size as u32,
        c.d_model as u32,
        c.num_heads as u32,
        c.num_kv_heads as u32,
        c.num_encoder_layers as u32,
        c.num_decoder_layers as u32,
        u32::from(input.fold == FoldMode::Tools),
    ];
    let originals: Vec<String> = input
        .name_map
        .iter()
        .map(|(_, original)| original.clone())
        .collect();
    // The limits the library reports are the planned workspace's.
    let info = super::driver::plan(&parts, &limits);
    values.extend([
        info.max_query_tokens as u32,
        info.max_query_bytes as u32,
        info.max_gen_len as u32,
        info.max_output_bytes as u32,
        originals.len() as u32,
        input.escalate_below.to_bits(),
    ]);
    debug_assert_eq!(values.len(), INFO_FIELDS.len());
    define_driver(&mut ks, &parts, &limits, &info, &values, &originals)?;
    let header = header_text(input, &info, &ks);
    let binding = rust_binding(
        &BindingFacts {
            name,
            target: ks.target().name,
            vocab_size: c.vocab_size,
            escalate_below: input.escalate_below,
            fold_tools: input.fold == FoldMode::Tools,
            tool_names: &originals,
        },
        &info,
    );
    let object = ks.finish()?;
    Ok(Library {
        object,
        header,
        binding,
        info,
    })
}

/// The header's status macros and the `NAME_info` and `NAME_result` typedefs (v1's and Needle
/// 3's libraries share the shape): `info_fields` are `uint32_t` but those in `float_fields`;
/// `result` is `(C type, field, comment)`; `besides` says what `call_ex` reports them besides.
pub(crate) fn header_types(
    name: &str,
    statuses: &[(&str, i32, &str)],
    info_fields: &[&str],
    float_fields: &[&str],
    result: &[(&str, &str, &str)],
    besides: &str,
) -> String {
    let up = name.to_ascii_uppercase();
    let mut extra = String::from("\n");
    for (status, value, doc) in statuses {
        extra.push_str(&format!(
            "#define {up}_{status} {value} /* {} */\n",
            // `NAME_` spells a macro, `name_` a function.
            doc.replace("NAME", &up)
                .replace("name_", &format!("{name}_"))
        ));
    }
    extra.push_str(&format!(
        "\n/* What {name}_model_info reports. */\ntypedef struct {name}_info {{\n"
    ));
    for field in info_fields {
        let ty = if float_fields.contains(field) {
            "float"
        } else {
            "uint32_t"
        };
        extra.push_str(&format!("    {ty} {field};\n"));
    }
    extra.push_str(&format!("}} {name}_info;\n"));
    extra.push_str(&format!(
        "\n/* What {name}_call_ex reports besides {besides}. */\ntypedef struct {name}_result {{\n"
    ));
    for (ty, field, doc) in result {
        let doc = doc
            .replace("NAME_ESCALATE_BELOW", &format!("{up}_ESCALATE_BELOW"))
            .replace("NAME_", &format!("{name}_"));
        extra.push_str(&format!("    {ty} {field}; /* {doc} */\n"));
    }
    extra.push_str(&format!("}} {name}_result;\n"));
    extra
}

fn header_text(input: &LibraryInput<'_>, info: &LibraryInfo, ks: &KernelSet) -> String {
    let name = input.name;
    let up = name.to_ascii_uppercase();
    let c = input.config;
    let mut extra = String::new();
    let mut define = |macro_name: &str, value: String, doc: &str| {
        extra.push_str(&format!("/* {doc} */\n#define {up}_{macro_name} {value}\n"));
    };
    define(
        "WORKSPACE_SIZE",
        format!("((size_t){})", info.layout.total),
        "bytes of workspace one call needs",
    );
    define(
        "WORKSPACE_ALIGN",
        WORKSPACE_ALIGN.to_string(),
        "the workspace's required alignment in bytes",
    );
    define(
        "MAX_QUERY_BYTES",
        format!("((size_t){})", info.max_query_bytes),
        "longest query accepted, in bytes",
    );
    define(
        "MAX_QUERY_TOKENS",
        format!("((size_t){})", info.max_query_tokens),
        "query tokens kept",
    );
    define(
        "MAX_GEN_LEN",
        format!("((size_t){})", info.max_gen_len),
        "at most MAX_GEN_LEN - 1 generated tokens",
    );
    define(
        "MAX_OUTPUT_BYTES",
        format!("((size_t){})", info.max_output_bytes),
        "an out buffer of this size always suffices",
    );
    define(
        "VOCAB_SIZE",
        c.vocab_size.to_string(),
        "token ids are below this",
    );
    define(
        "ESCALATE_BELOW",
        format!("{:?}f", input.escalate_below),
        "call_ex sets escalate when the confidence is below this (0: never)",
    );
    define(
        "FOLD_TOOLS",
        u32::from(input.fold == FoldMode::Tools).to_string(),
        "1: tools side folded",
    );
    extra.push_str(&header_types(
        name,
        STATUSES,
        INFO_FIELDS,
        INFO_FLOAT_FIELDS,
        RESULT_FIELDS,
        "the answer",
    ));
    let preamble = [
        format!("{name}: a Needle tool-calling model compiled by needlec for {}.", ks.target().name),
        "Link lib".to_string() + name + ".a; it needs nothing else (no libc, no allocator).",
        "Each call needs its own workspace of NAME_WORKSPACE_SIZE bytes aligned to".replace("NAME", &up)
            + &format!(" {up}_WORKSPACE_ALIGN;"),
        "threads with separate workspaces may call concurrently.".to_string(),
        format!(
            "{name}_call(ws, query, query_len, out, out_cap, &out_len) writes the tool-call JSON for a"
        ),
        "UTF-8 query into out (no NUL) and returns 0, or a status code below.".to_string(),
        format!(
            "{name}_call_ex(..., &result) does the same and fills *result (below): confidence, escalate, tool."
        ),
    ];
    let preamble: Vec<&str> = preamble.iter().map(String::as_str).collect();
    // The info struct is named after the library, which CType cannot spell: type it here.
    write_header(name, &preamble, &extra, ks.functions())
        .replace(
            &format!("void {name}_model_info(void *info);"),
            &format!("void {name}_model_info({name}_info *info);"),
        )
        .replace(
            "size_t *out_len, void *result);",
            &format!("size_t *out_len, {name}_result *result);"),
        )
        // Doc lines of the driver's declarations name other symbols as NAME_x.
        .replace("NAME_", &format!("{name}_"))
}
