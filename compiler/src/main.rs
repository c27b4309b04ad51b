//! The `needlec` command line.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use needle_runtime::decode::{Engine, FoldMode, Generation, DEFAULT_MAX_GEN_LEN};
use needle_runtime::quant::Precision;
use needlec::build::{self, BuildOptions, Emit};
use needlec::frontend;

#[derive(Parser)]
#[command(
    name = "needlec",
    version,
    about = "Ahead-of-time compiler for Needle tool-calling models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum FoldArg {
    /// Precompute the tools side (exact for checkpoints trained with isolated tool attention).
    Tools,
    /// Encode the whole prompt per query, exactly like the reference.
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EmitArg {
    Staticlib,
    Obj,
    Ir,
    Header,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Checkpoint: the original needle.pkl or a safetensors file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// SentencePiece `.model` file (or a Hugging Face `tokenizer.json`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Tool list: a file path, or inline JSON when the value starts with `[`.
    #[arg(long)]
    tools: String,
    /// Fold the tools side into constants; the default follows the checkpoint's `tool_attention`.
    #[arg(long, value_enum)]
    fold: Option<FoldArg>,
    /// At most `max_gen_len - 1` tokens are generated.
    #[arg(long, default_value_t = DEFAULT_MAX_GEN_LEN)]
    max_gen_len: usize,
    /// Weights as a library built with `--weights` computes them: `int8`/`int4` the reference's
    /// group quantization of every Dense kernel, `f16` IEEE half. Default: the checkpoint's own
    /// (`f16` for float16 checkpoints, else `f32`).
    #[arg(long, value_name = "f32|f16|int8|int4")]
    weights: Option<Precision>,
    /// Bound the query to N tokens, as a library built with it: longer queries are cut with
    /// `--fold tools` and refused with `--fold none`. Default: as many as the model allows.
    #[arg(long, value_name = "N")]
    max_query_tokens: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one query: prints the tool-call JSON exactly as the reference returns it.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// The user's query.
        #[arg(long)]
        query: OsString,
    },
    /// Compile a checkpoint, its tokenizer and a fixed tool list into a standalone native library
    /// and C header.
    Build {
        /// Checkpoint: the original needle.pkl or a safetensors file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// SentencePiece `.model` file (or a Hugging Face `tokenizer.json`).
        #[arg(long)]
        tokenizer: PathBuf,
        /// Tool list: a file path, or inline JSON when the value starts with `[`.
        #[arg(long)]
        tools: String,
        /// Target triple (`needlec targets` lists them); default: this machine's.
        #[arg(long)]
        target: Option<String>,
        /// Opt into a CPU level's ISA extensions (`needlec targets` lists them; `native`: this
        /// machine's, host builds only). Default: the baseline every device of the triple runs.
        #[arg(long)]
        cpu: Option<String>,
        /// Extra ISA features, comma-separated (e.g. `fma`, `dotprod`, `v`).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// Fold the tools side into constants; the default follows the checkpoint.
        #[arg(long, value_enum)]
        fold: Option<FoldArg>,
        /// How weights are stored: `f32`, `f16` (IEEE half), `int8` or `int4` (the reference's
        /// group-wise quantization of every Dense kernel; `int4` is the phone build). Default:
        /// the lossless one for the checkpoint (`f16` for float16 checkpoints, else `f32`).
        #[arg(long)]
        weights: Option<Precision>,
        /// At most `max_gen_len - 1` tokens are generated; it bounds the workspace.
        #[arg(long, default_value_t = DEFAULT_MAX_GEN_LEN)]
        max_gen_len: usize,
        /// Bound the query to N tokens, as `needlec run --max-query-tokens N`: longer queries are
        /// cut with `--fold tools` and refused (`NAME_ERR_QUERY_TOO_LONG`) with `--fold none`.
        /// A smaller N needs a smaller workspace. Default: as many as the model allows.
        #[arg(long, value_name = "N")]
        max_query_tokens: Option<usize>,
        /// Prefix of every exported symbol and macro.
        #[arg(long, default_value = "needle")]
        name: String,
        /// What to write (repeatable); default: staticlib and header.
        #[arg(long, value_enum)]
        emit: Vec<EmitArg>,
        #[arg(long)]
        out_dir: PathBuf,
    },
    /// List the supported target triples, their CPU levels and ISA features.
    Targets,
    /// Print the decoder's view of one query as JSON: encoder ids, decoder ids, top-5 logits and
    /// grammar activity at every step.
    Trace {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        query: OsString,
        /// Teacher-force this answer JSON instead of decoding greedily.
        #[arg(long)]
        answer: Option<String>,
    },
    /// Tokenize JSON strings read one per line from stdin; prints one JSON array of ids per line.
    Tokenize {
        #[arg(long)]
        tokenizer: PathBuf,
    },
    /// Tokenizer file conversions.
    #[command(subcommand)]
    Tokenizer(TokenizerCommand),
    /// Print a checkpoint's config, parameter count and tensor table.
    Inspect { path: PathBuf },
    /// Convert a checkpoint to safetensors (config in the `needle_config` metadata).
    Convert {
        input: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a deterministic random checkpoint (for tests and benchmarks).
    Synth {
        /// `full`, `tiny`, `small`, or a JSON object of config keys.
        #[arg(long)]
        config: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Write a SentencePiece `.model` as a Hugging Face `tokenizer.json` that Hugging Face's
    /// `tokenizers` library (and `needlec --tokenizer`) encodes like the model.
    Export {
        /// The SentencePiece `.model` file.
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by `: `, each cause once: errors that already print their
/// source in their own message (most of ours do) would otherwise repeat it.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

fn real_main() -> Result<()> {
    match Cli::parse().command {
        Command::Run { model, query } => {
            let query = utf8_query(query)?;
            let engine = load_engine(&model)?;
            let generation = engine.generate(&query, model.max_gen_len)?;
            println!("{}", generation.output);
        }
        Command::Build {
            checkpoint,
            tokenizer,
            tools,
            target,
            cpu,
            features,
            fold,
            weights,
            max_gen_len,
            max_query_tokens,
            name,
            emit,
            out_dir,
        } => {
            let mut emit: Vec<Emit> = emit
                .into_iter()
                .map(|e| match e {
                    EmitArg::Staticlib => Emit::Staticlib,
                    EmitArg::Obj => Emit::Obj,
                    EmitArg::Ir => Emit::Ir,
                    EmitArg::Header => Emit::Header,
                })
                .collect();
            if emit.is_empty() {
                emit = vec![Emit::Staticlib, Emit::Header];
            }
            emit.sort();
            emit.dedup();
            let opts = BuildOptions {
                checkpoint,
                tokenizer,
                tools,
                target: match target {
                    Some(t) => t,
                    None => needle_targets::Target::host()?.name.to_string(),
                },
                cpu,
                features,
                fold: fold.map(fold_mode),
                weights,
                max_gen_len,
                max_query_tokens,
                name,
                emit,
                out_dir,
            };
            let report = with_spinner("building", || build::build(&opts))?;
            if let Some(warning) = report.fold_warning {
                eprintln!("warning: {warning}");
            }
            if let Some(notice) = report.weights_notice {
                eprintln!("note: {notice}");
            }
            eprintln!("{}", report.summary);
            for path in report.written {
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Targets => {
            for t in needle_targets::supported() {
                let target = needle_targets::Target::from_triple(t.triple)?;
                println!("{:<30} {}", t.triple, t.note);
                println!(
                    "{:<30} --cpu: {}",
                    "",
                    needle_targets::cpus(target.arch).join(", ")
                );
                println!(
                    "{:<30} --features: {}",
                    "",
                    needle_targets::known_features(target.arch).join(", ")
                );
            }
        }
        Command::Trace {
            model,
            query,
            answer,
        } => {
            let query = utf8_query(query)?;
            let engine = load_engine(&model)?;
            let generation = match answer {
                Some(answer) => engine.forced(&query, &engine.tokenizer.encode(&answer))?,
                None => engine.generate(&query, model.max_gen_len)?,
            };
            println!("{}", trace_json(&generation));
        }
        Command::Tokenize { tokenizer } => {
            let tokenizer = frontend::load_tokenizer(&tokenizer)?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for (n, line) in std::io::stdin().lock().lines().enumerate() {
                let line = line.with_context(|| format!("reading stdin line {}", n + 1))?;
                if line.trim().is_empty() {
                    continue;
                }
                let text: String = serde_json::from_str(&line).with_context(|| {
                    format!(
                        "stdin line {}: expected one JSON string per line, e.g. \"set a timer\"",
                        n + 1
                    )
                })?;
                writeln!(out, "{}", serde_json::to_string(&tokenizer.encode(&text))?)?;
            }
        }
        Command::Tokenizer(TokenizerCommand::Export { tokenizer, output }) => {
            let tok = frontend::load_tokenizer(&tokenizer)?;
            let json = tok
                .to_hf_json()
                .with_context(|| format!("exporting {}", tokenizer.display()))?;
            std::fs::write(&output, json)
                .with_context(|| format!("writing {}", output.display()))?;
        }
        Command::Inspect { path } => {
            let ckpt = with_spinner("loading checkpoint", || {
                needlec::load::load_checkpoint(&path)
            })?;
            print!("{}", needlec::load::inspect_report(&ckpt));
        }
        Command::Convert { input, output } => {
            let ckpt = with_spinner("loading checkpoint", || {
                needlec::load::load_checkpoint(&input)
            })?;
            needlec::load::save_safetensors(&ckpt, &output)?;
            eprintln!("wrote {}", output.display());
        }
        Command::Synth {
            config,
            seed,
            output,
        } => {
            let config = needlec::synth::parse_config_spec(&config)?;
            let ckpt = needlec::synth::synth_checkpoint(
                &config,
                seed,
                needle_runtime::checkpoint::DType::F32,
            );
            needlec::load::save_safetensors(&ckpt, &output)?;
            eprintln!("wrote {}", output.display());
        }
    }
    Ok(())
}

fn utf8_query(query: OsString) -> Result<String> {
    query.into_string().map_err(|raw| {
        anyhow::anyhow!(
            "--query is not valid UTF-8 ({} bytes as given: {:?}); pass the query as UTF-8 text",
            raw.len(),
            raw
        )
    })
}

fn load_engine(args: &ModelArgs) -> Result<Engine> {
    let options = frontend::ModelOptions {
        fold: args.fold.map(fold_mode),
        weights: args.weights,
        max_query_tokens: args.max_query_tokens,
    };
    let loaded = with_spinner("loading checkpoint, tokenizer and tools", || {
        frontend::load_with(&args.checkpoint, &args.tokenizer, &args.tools, &options)
    })?;
    for warning in loaded.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(loaded.engine)
}

fn fold_mode(arg: FoldArg) -> FoldMode {
    match arg {
        FoldArg::Tools => FoldMode::Tools,
        FoldArg::None => FoldMode::None,
    }
}

fn trace_json(g: &Generation) -> String {
    let steps: Vec<serde_json::Value> = g
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "top": s.top.iter().map(|&(id, logit)| serde_json::json!([id, logit])).collect::<Vec<_>>(),
                "grammar_active": s.grammar_active,
                "allowed": s.allowed,
                "next": s.next,
            })
        })
        .collect();
    serde_json::json!({
        "enc_ids": g.prompt.enc_ids,
        "n_query_tokens": g.prompt.n_query_tokens,
        "dec_ids": g.dec_ids,
        "steps": steps,
        "text": g.text,
        "output": g.output,
    })
    .to_string()
}

/// Shows a spinner on a terminal while a long step runs (indicatif hides it elsewhere).
fn with_spinner<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let spinner = indicatif::ProgressBar::new_spinner().with_message(what.to_string());
    spinner.enable_steady_tick(Duration::from_millis(100));
    let out = f();
    spinner.finish_and_clear();
    out
}
