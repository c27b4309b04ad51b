//! Needle 3 checkpoints in needlec's commands: told apart from v1 files by content, loaded from
//! safetensors or the `.cact` export, sliced to a ladder depth (`--layers`), described by
//! `inspect` and answered by `run` through the runtime's engine
//! ([`needle_runtime::needle3::engine`]). The semantics are in `docs/needle3.md`.

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use needle_runtime::needle3::cact::{self, Cact, Format};
use needle_runtime::needle3::config::looks_like_needle3;
use needle_runtime::needle3::engine::{Engine, Generation};
use needle_runtime::needle3::prompt::tools_json;
use needle_runtime::needle3::{self, Config, Model};

use crate::frontend::{load_tokenizer, FrontendError};
use crate::load::{human_bytes, read_limited, Limited, MAX_CHECKPOINT_BYTES};
use crate::tools::{load_tools_arg_text, ToolsError};

/// Why a Needle 3 command failed.
#[derive(Debug, thiserror::Error)]
pub enum Needle3Error {
    #[error("reading {}: {cause}", .path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{} is larger than {}, more than any Needle 3 checkpoint", .path.display(), human_bytes(MAX_CHECKPOINT_BYTES))]
    TooLarge { path: PathBuf },
    #[error("{}: {cause}", .path.display())]
    Model {
        path: PathBuf,
        cause: needle3::Error,
    },
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Tools(#[from] ToolsError),
    #[error("{0}")]
    Engine(needle3::Error),
    #[error(transparent)]
    Build(crate::build::BuildError),
    #[error("a Needle 3 build does not take {0}")]
    Unsupported(String),
}

/// Whether the file at `path` is a Needle 3 checkpoint: a `.cact` export, or a safetensors
/// file whose metadata `config` has Needle 3's keys. Reads only the file's head; any file that
/// is not one (or cannot be read) is left to the v1 loader and its errors.
pub fn is_needle3_checkpoint(path: &Path) -> bool {
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut head = [0u8; 8];
    if file.read_exact(&mut head).is_err() {
        return false;
    }
    if cact::is_cact(&head) {
        return true;
    }
    let n = u64::from_le_bytes(head);
    // A safetensors header is JSON of at most this many bytes here; larger is not Needle 3's.
    if !(2..=16 << 20).contains(&n) {
        return false;
    }
    let mut header = Vec::new();
    if file.take(n).read_to_end(&mut header).is_err() {
        return false;
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return false;
    };
    json["__metadata__"]["config"]
        .as_str()
        .and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
        .is_some_and(|c| looks_like_needle3(&c))
}

fn read(path: &Path) -> Result<Vec<u8>, Needle3Error> {
    let read = read_limited(
        path,
        MAX_CHECKPOINT_BYTES,
        0,
        |cause| Needle3Error::Io {
            path: path.into(),
            cause,
        },
        |_| Ok(()),
    )?;
    match read {
        Limited::Read(data) => Ok(data),
        Limited::TooLarge => Err(Needle3Error::TooLarge { path: path.into() }),
    }
}

/// Loads a Needle 3 checkpoint as float32 (CQ codes dequantized), at ladder depth `layers`
/// (`None`: every layer).
pub fn load_model(path: &Path, layers: Option<usize>) -> Result<Model, Needle3Error> {
    let data = read(path)?;
    let model_err = |cause| Needle3Error::Model {
        path: path.into(),
        cause,
    };
    let model = if cact::is_cact(&data) {
        Model::from_cact_bytes(&data)
    } else {
        Model::from_safetensors_bytes(&data)
    }
    .map_err(model_err)?;
    match layers {
        None => Ok(model),
        Some(depth) => model.into_ladder(depth).map_err(model_err),
    }
}

/// What `run` takes for a Needle 3 model.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub checkpoint: PathBuf,
    pub tokenizer: PathBuf,
    /// `--tools`: a path, or inline JSON starting with `[`; rendered into the prompt as given.
    pub tools: String,
    /// `--system`: the system turn's text (none when empty).
    pub system: String,
    /// `--layers N`: the ladder depth.
    pub layers: Option<usize>,
    /// Fold the prefix up to `</tools>` (the default: it is exact for Needle 3).
    pub fold: bool,
    /// `--grammar strict`: decode inside the envelope under the tool schemas.
    pub strict: bool,
}

/// Loads the model, tokenizer and tools, and folds the prefix when asked.
pub fn load_engine(opts: &RunOptions) -> Result<Engine, Needle3Error> {
    let model = load_model(&opts.checkpoint, opts.layers)?;
    let tokenizer = load_tokenizer(&opts.tokenizer)?;
    let tools = load_tools_arg_text(&opts.tools)?;
    let tools = tools_json(&tools).map_err(|e| Needle3Error::Engine(e.into()))?;
    let engine = Engine::new(model, tokenizer, &opts.system, tools, opts.fold)
        .map_err(Needle3Error::Engine)?;
    if opts.strict {
        return engine.with_strict_grammar().map_err(Needle3Error::Engine);
    }
    Ok(engine)
}

/// The answer's details as `run --confidence` prints them (a second line after the calls).
pub fn details_json(g: &Generation) -> serde_json::Value {
    let sigmoid = |x: f32| 1.0 / (1.0 + (-f64::from(x)).exp());
    serde_json::json!({
        "reasoning": g.reasoning,
        "parsed": g.parsed,
        "confidence": g.heads.confidence.map(sigmoid),
        "confidence_logit": g.heads.confidence,
        "router": g.heads.router,
        "generated_tokens": g.new_ids.len(),
    })
}

/// `inspect` of a Needle 3 file: generation, config, ladder depths and every tensor's storage.
pub fn inspect_report(path: &Path) -> Result<String, Needle3Error> {
    let data = read(path)?;
    let model_err = |cause| Needle3Error::Model {
        path: path.into(),
        cause,
    };
    let mut out = String::new();
    let (config, tensors) = if cact::is_cact(&data) {
        let file = Cact::parse(&data).map_err(model_err)?;
        let config = file.config().map_err(model_err)?;
        let rows: Vec<[String; 4]> = file
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let format = match e.format {
                    Format::F16 => "f16".to_string(),
                    Format::F32 => "f32".to_string(),
                    Format::Raw => "raw".to_string(),
                    Format::Cq { group, bits: 5 } => format!("cq ternary, group {group}"),
                    Format::Cq { group, bits } => format!("cq{bits}, group {group}"),
                };
                [
                    format!("#{i}"),
                    format,
                    format!("{:?}", e.shape),
                    e.nbytes.to_string(),
                ]
            })
            .collect();
        let _ = writeln!(out, "generation: Needle 3 (.cact export)");
        (config, rows)
    } else {
        let src = needle3::model::SafetensorsSource::new(&data).map_err(model_err)?;
        let config = src.config().map_err(model_err)?;
        let st = safetensors::SafeTensors::deserialize(&data)
            .map_err(|e| model_err(needle3::Error::Safetensors(e.to_string())))?;
        let mut rows: Vec<[String; 4]> = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                [
                    name,
                    format!("{:?}", view.dtype()).to_lowercase(),
                    format!("{:?}", view.shape()),
                    view.data().len().to_string(),
                ]
            })
            .collect();
        rows.sort();
        let _ = writeln!(out, "generation: Needle 3 (safetensors)");
        (config, rows)
    };
    write_config(&mut out, &config);
    let _ = writeln!(
        out,
        "depth: {} layers; ladder depths 2 to {} (`--layers N`)",
        config.num_layers, config.num_layers
    );
    let widths: Vec<usize> = (0..4)
        .map(|c| tensors.iter().map(|r| r[c].len()).max().unwrap_or(0).max(6))
        .collect();
    let _ = writeln!(
        out,
        "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
        "tensor",
        "format",
        "shape",
        "bytes",
        w0 = widths[0],
        w1 = widths[1],
        w2 = widths[2],
        w3 = widths[3]
    );
    for r in &tensors {
        let _ = writeln!(
            out,
            "{:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3]
        );
    }
    Ok(out)
}

fn write_config(out: &mut String, c: &Config) {
    let rows = [
        ("vocab_size", c.vocab_size.to_string()),
        ("d_model", c.d_model.to_string()),
        ("num_heads", c.num_heads.to_string()),
        ("num_kv_heads", c.num_kv_heads.to_string()),
        ("num_layers", c.num_layers.to_string()),
        ("qk_head_dim", c.qk_head_dim().to_string()),
        ("v_head_dim", c.v_head_dim().to_string()),
        ("max_seq_len", c.max_seq_len.to_string()),
        ("sliding_window", c.sliding_window.to_string()),
        ("global_layers", format!("{:?}", c.global_layers)),
        ("engram_layers", format!("{:?}", c.engram_layers)),
        ("engram_orders", format!("{:?}", c.engram_orders)),
        ("mhc_lanes", c.mhc_lanes.to_string()),
        ("qkv_conv_taps", c.qkv_conv_taps.to_string()),
        ("embedding_dim", c.embedding_dim.to_string()),
    ];
    let _ = writeln!(out, "config:");
    for (k, v) in rows {
        let _ = writeln!(out, "  {k:<16}{v}");
    }
}

/// `trace` of a Needle 3 model: the prompt's ids and fold split, each step's five highest
/// logits and chosen id, the text, the envelope and the heads. With `answer` (the calls as
/// JSON), the answer `render_target` writes is teacher-forced instead of decoding greedily.
pub fn trace(
    engine: &Engine,
    query: &str,
    answer: Option<&str>,
    max_new: usize,
) -> Result<serde_json::Value, Needle3Error> {
    let g = match answer {
        Some(answer) => {
            let calls = needle_runtime::pyjson::parse(answer).map_err(|e| {
                Needle3Error::Engine(needle3::Error::Config(format!(
                    "--answer is not JSON: {e}; give the calls, e.g. \
                     '[{{\"name\":\"get_weather\",\"arguments\":{{\"location\":\"Paris\"}}}}]'"
                )))
            })?;
            let target = needle3::prompt::render_target("", &calls);
            let ids = engine.tokenizer.encode(&target);
            engine.forced(query, &ids)
        }
        None => engine.generate(query, max_new),
    }
    .map_err(Needle3Error::Engine)?;
    let steps: Vec<serde_json::Value> = g
        .logits
        .iter()
        .zip(&g.new_ids)
        .map(|(row, &next)| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            // Highest first; the lower id first on ties, as argmax picks.
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            let top: Vec<serde_json::Value> = order
                .iter()
                .take(5)
                .map(|&i| serde_json::json!([i, row[i]]))
                .collect();
            serde_json::json!({ "top": top, "next": next })
        })
        .collect();
    let mut details = details_json(&g);
    details["generation"] = "needle3".into();
    details["prompt_ids"] = serde_json::json!(g.prompt.ids);
    details["prefix_len"] = serde_json::json!(g.prompt.prefix_len);
    details["folded"] = engine.folded().into();
    details["new_ids"] = serde_json::json!(g.new_ids);
    details["steps"] = serde_json::json!(steps);
    details["text"] = g.text.clone().into();
    details["calls"] = g.calls.clone().into();
    details["embedding"] = serde_json::json!(g.heads.embedding);
    Ok(details)
}

/// What `needlec build` takes for a Needle 3 checkpoint besides v1's options.
#[derive(Clone, Debug, Default)]
pub struct Needle3BuildOptions {
    /// `--system`: the system turn's text, fixed in the library (none when empty).
    pub system: String,
    /// `--layers N`: the ladder depth.
    pub layers: Option<usize>,
}

/// The most query-part ids a Needle 3 library reads unless `--max-query-tokens` says otherwise:
/// the markup takes 8 of them, so a few hundred words of query.
pub const DEFAULT_MAX_QUERY_TOKENS: usize = 512;

/// `needlec build` of a Needle 3 checkpoint: the library of
/// [`crate::codegen::needle3::library`] for the target, written as v1's are (staticlib, object,
/// header). Options that are v1's only (`--weights` other than f32, `--grammar strict`,
/// `--quantize-activations`, `--emit ir|rust|report|xcframework`) are refused by name.
pub fn build(
    opts: &crate::build::BuildOptions,
    n3: &Needle3BuildOptions,
) -> Result<crate::build::BuildReport, Needle3Error> {
    use crate::build::{staticlib_file, target_of, BuildReport, Emit};
    use crate::codegen::needle3::library::{generate_needle3, Needle3LibraryInput};
    use crate::emit::{check_standalone, write_archive, ArchiveMember};
    let refuse = |what: &str| Err(Needle3Error::Unsupported(what.to_string()));
    if !crate::build::is_c_identifier(&opts.name) {
        return Err(Needle3Error::Build(crate::build::BuildError::BadName(
            opts.name.clone(),
        )));
    }
    if let Some(p) = opts.weights {
        if p != crate::precision::Precision::F32 {
            return refuse(&format!(
                "--weights {p}: a Needle 3 library stores the checkpoint's own formats (a .cact \
                 export's CQ codes as codes, a safetensors checkpoint's floats as float32); for \
                 CQ weights build from the package's .cact export, and drop --weights"
            ));
        }
    }
    if opts.quantize_activations {
        return refuse("--quantize-activations is for v1 int8/int4 builds; drop it");
    }
    for e in &opts.emit {
        let flag = match e {
            Emit::Staticlib | Emit::Obj | Emit::Header | Emit::Xcframework => continue,
            Emit::Ir => "ir",
            Emit::Rust => "rust",
            Emit::Report => "report (or --report)",
        };
        return refuse(&format!(
            "--emit {flag}: a Needle 3 build writes staticlib, obj, header and xcframework; \
             use those"
        ));
    }
    if !(2..=crate::build::MAX_GEN_LEN_LIMIT).contains(&opts.max_gen_len) {
        return Err(Needle3Error::Build(crate::build::BuildError::MaxGenLen {
            got: opts.max_gen_len,
            max: crate::build::MAX_GEN_LEN_LIMIT,
        }));
    }
    if !(0.0..=1.0).contains(&opts.escalate_below) {
        return Err(Needle3Error::Build(
            crate::build::BuildError::EscalateBelow(opts.escalate_below),
        ));
    }
    let target = target_of(opts).map_err(Needle3Error::Build)?;
    let fold = match opts.fold {
        None | Some(needle_runtime::decode::FoldMode::Tools) => true,
        Some(needle_runtime::decode::FoldMode::None) => false,
    };
    let model = load_model(&opts.checkpoint, n3.layers)?;
    let tokenizer = load_tokenizer(&opts.tokenizer)?;
    let tools_text = load_tools_arg_text(&opts.tools)?;
    let tools = tools_json(&tools_text).map_err(|e| Needle3Error::Engine(e.into()))?;
    let tool_names = tool_names(&tools);
    needle3::prompt::check_tokenizer(&tokenizer).map_err(|e| Needle3Error::Engine(e.into()))?;
    let prompt = needle3::prompt::encode_prompt(&tokenizer, &n3.system, &tools, "")
        .map_err(|e| Needle3Error::Engine(e.into()))?;
    let prefix_ids = &prompt.ids[..prompt.prefix_len];
    // The model reads `max_seq_len` positions: the prefix, the query part and the answer.
    let max_seq = model.config.max_seq_len;
    let room = max_seq.saturating_sub(prefix_ids.len() + opts.max_gen_len - 1);
    let max_query_tokens = opts
        .max_query_tokens
        .unwrap_or(DEFAULT_MAX_QUERY_TOKENS.min(room));
    // The markup around the query is 8 ids or so: fewer leaves no room for a query.
    let markup = needle3::prompt::encode_query(&tokenizer.continuing(), "").len();
    let positions = format!(
        "the model reads {max_seq} positions; the system turn and tools take {} and \
         --max-gen-len {} the answer, which leaves {room} for the query part",
        prefix_ids.len(),
        opts.max_gen_len
    );
    if room <= markup {
        return Err(Needle3Error::Unsupported(format!(
            "this tool list with --max-gen-len {}: {positions}, and its markup alone is \
             {markup}; give a smaller --max-gen-len or tool list",
            opts.max_gen_len
        )));
    }
    if max_query_tokens > room || max_query_tokens <= markup {
        return Err(Needle3Error::Unsupported(format!(
            "--max-query-tokens {max_query_tokens}: {positions}, and its markup alone is \
             {markup}; give one between {} and {room}",
            markup + 1
        )));
    }
    let strict = if opts.grammar == needle_runtime::decode::GrammarKind::Strict {
        let tables = needle3::grammar::EnvelopeTables::new(&tokenizer, &tools)
            .map_err(|e| Needle3Error::Engine(e.into()))?;
        let max_new = opts.max_gen_len - 1;
        if max_new < tables.calls_cost() {
            return Err(Needle3Error::Engine(needle3::Error::StrictBudget {
                allows: max_new,
                needed: tables.calls_cost(),
            }));
        }
        Some(tables)
    } else {
        None
    };
    let input = Needle3LibraryInput {
        model: &model,
        tokenizer: &tokenizer,
        prefix_ids,
        fold,
        tool_names: &tool_names,
        name: &opts.name,
        max_gen_len: opts.max_gen_len,
        max_query_tokens,
        escalate_below: opts.escalate_below as f32,
        strict: strict.as_ref(),
    };
    let lib = generate_needle3(&input, &target)
        .map_err(|e| Needle3Error::Build(crate::build::BuildError::Codegen(e)))?;
    check_standalone(&lib.object, &format!("{}_", opts.name))
        .map_err(|e| Needle3Error::Build(crate::build::BuildError::Emit(e)))?;
    std::fs::create_dir_all(&opts.out_dir).map_err(|cause| Needle3Error::Io {
        path: opts.out_dir.clone(),
        cause,
    })?;
    let name = &opts.name;
    let mut written = Vec::new();
    for emit in &opts.emit {
        let (file, bytes) = match emit {
            Emit::Header => (format!("{name}.h"), lib.header.clone().into_bytes()),
            Emit::Obj => (
                format!("{name}.{}", target.object_extension()),
                lib.object.clone(),
            ),
            Emit::Staticlib => {
                let member = ArchiveMember {
                    name: format!("{name}.{}", target.object_extension()),
                    data: lib.object.clone(),
                };
                (
                    staticlib_file(&target, name),
                    write_archive(target.archive_kind(), &[member])
                        .map_err(|e| Needle3Error::Build(crate::build::BuildError::Emit(e)))?,
                )
            }
            Emit::Xcframework => {
                // Every Apple target's library (baseline CPUs), one slice per platform.
                let mut built = Vec::new();
                for slice in crate::emit::xcframework::SLICES {
                    for (triple, _) in slice.targets {
                        let apple = needle_targets::Target::with_cpu(triple, None, &[])
                            .map_err(|e| Needle3Error::Build(e.into()))?;
                        let l = generate_needle3(&input, &apple).map_err(|e| {
                            Needle3Error::Build(crate::build::BuildError::Codegen(e))
                        })?;
                        check_standalone(&l.object, &format!("{name}_"))
                            .map_err(|e| Needle3Error::Build(e.into()))?;
                        let member = ArchiveMember {
                            name: format!("{name}.{}", apple.object_extension()),
                            data: l.object,
                        };
                        built.push(crate::emit::xcframework::Built {
                            triple,
                            archive: write_archive(apple.archive_kind(), &[member])
                                .map_err(|e| Needle3Error::Build(e.into()))?,
                            header: l.header,
                        });
                    }
                }
                written.extend(
                    crate::emit::xcframework::assemble(&opts.out_dir, name, &built)
                        .map_err(|e| Needle3Error::Build(e.into()))?,
                );
                continue;
            }
            _ => continue,
        };
        let path = opts.out_dir.join(file);
        std::fs::write(&path, &bytes).map_err(|cause| Needle3Error::Io {
            path: path.clone(),
            cause,
        })?;
        written.push(path);
    }
    let summary = format!(
        "{target}, Needle 3 ({} layers), --fold {}, weights {}{}: {} query-part tokens at \
         most, prefix {} tokens, workspace {} bytes, code and data {} bytes",
        model.layers.len(),
        if fold { "tools" } else { "none" },
        if model.embedding_cq.is_some() {
            "CQ codes (the .cact export's)"
        } else {
            "float32"
        },
        if strict.is_some() {
            ", --grammar strict"
        } else {
            ""
        },
        lib.info.max_query_tokens,
        prefix_ids.len(),
        lib.info.layout.total,
        lib.object.len()
    );
    Ok(BuildReport {
        written,
        fold_warning: None,
        weights_notice: None,
        room_warning: None,
        summary,
        size_report: None,
    })
}

/// The tools' names in tool order: each entry's `name`, or its `function.name` (the OpenAI
/// shape); an entry without one gets an empty name (it can never be the call's tool).
pub fn tool_names(tools_json: &str) -> Vec<String> {
    use needle_runtime::pyjson::{parse, Value};
    let Ok(Value::Array(items)) = parse(tools_json) else {
        return Vec::new();
    };
    items
        .iter()
        .map(|t| {
            t.get("name")
                .or_else(|| t.get("function").and_then(|f| f.get("name")))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}
