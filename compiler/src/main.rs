//! The `needlec` command line.

#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use needle_runtime::decode::{Engine, FoldMode, Generation, GrammarKind, DEFAULT_MAX_GEN_LEN};

/// `--max-gen-len` within `2..=512`, checked before anything is loaded.
fn check_max_gen_len(n: usize) -> Result<()> {
    Ok(needle_runtime::decode::check_max_gen_len(n)?)
}
use needle_runtime::quant::Precision;
use needlec::build::{self, BuildOptions, Emit};
use needlec::{frontend, needle3};

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
    /// `NAME.rs`: the Rust binding (a safe `Needle` type over the C interface; include it in
    /// a crate that links libNAME.a, as examples/rust does).
    Rust,
    /// `NAME.report.json`: bytes per component, workspace regions, options (see `--report`).
    Report,
    /// `NAME.xcframework/` (Info.plist, a static library per Apple platform, headers, module
    /// map) and `Package.swift`, built for every Apple target whatever `--target` says.
    Xcframework,
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
    /// `reference`: the original grammar (tool names and argument keys only); `strict`: a valid
    /// call list under the tool schemas, closed within --max-gen-len (docs/spec.md).
    #[arg(long, value_name = "reference|strict", default_value = "reference")]
    grammar: GrammarKind,
    /// Needle 3 only: the system turn's text (none by default).
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
    /// Needle 3 only: run the model at this ladder depth (2 to its layer count), as the
    /// package slices it (docs/needle3.md, "Ladder slicing").
    #[arg(long, value_name = "N")]
    layers: Option<usize>,
}

#[derive(clap::Args)]
struct FinetuneArgs {
    /// The checkpoint to start from: the original needle.pkl or a safetensors file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// SentencePiece `.model` file (or a Hugging Face `tokenizer.json`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Training examples, the JSON Lines `eval` reads (`query`, `tools`, `answers`).
    #[arg(long)]
    data: PathBuf,
    /// Validation examples: loss and greedy exact-match every --val-every steps; the best
    /// checkpoint is the one written.
    #[arg(long)]
    val: Option<PathBuf>,
    /// Train with the tools-isolation mask (tools-side positions attend only to the tools side)
    /// and write `"tool_attention": "isolated"`, so `build` folds by default.
    #[arg(long)]
    isolate_tools: bool,
    /// Learn from the stock model's own exact-mode behaviour: its next-token distributions as
    /// soft targets (the whole loss unless --distill-weight says otherwise), and its greedy
    /// answers as the labels of lines without `answers` (which may then be left out).
    #[arg(long)]
    distill: bool,
    /// Under --distill, the share of the loss that matching the teacher's distributions takes;
    /// the rest is the labels' cross-entropy [default: 1].
    #[arg(long, value_name = "W", allow_negative_numbers = true)]
    distill_weight: Option<f64>,
    /// Under --distill, the temperature that softens the teacher's and the student's
    /// distributions before they are compared [default: 2].
    #[arg(long, value_name = "T", allow_negative_numbers = true)]
    distill_temperature: Option<f64>,
    /// Every epoch, give half the labelled examples new argument values (in the query and the
    /// answer alike), so the model learns to copy values rather than memorize them.
    #[arg(long)]
    augment: bool,
    /// Quantization-aware training: the forward pass uses the `--weights int4|int8` quantization
    /// of every Dense kernel (straight-through gradients).
    #[arg(long, value_name = "int4|int8")]
    qat: Option<Precision>,
    /// Train rank-R adapters of every attention kernel instead of the weights; merged into a
    /// plain checkpoint at the end.
    #[arg(long, value_name = "R")]
    lora_rank: Option<usize>,
    /// Optimizer steps (default: one epoch).
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<usize>,
    /// Passes over the data.
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Peak learning rate (AdamW, linear warmup, cosine decay to 0).
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Score and keep an exponential moving average of the weights, with this decay per step
    /// (0.995 averages about the last 200 steps), instead of the weights themselves.
    #[arg(long, value_name = "DECAY", allow_negative_numbers = true)]
    ema: Option<f64>,
    /// Warmup steps (default: a tenth of the steps, at most 100).
    #[arg(long)]
    warmup: Option<usize>,
    /// Clip the gradients' global norm to this.
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Data order and adapter initialization; the same seed and inputs give the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Validate every N steps (and after the last).
    #[arg(long, default_value_t = 100)]
    val_every: usize,
    /// Validate on the first N examples of --val only.
    #[arg(long, value_name = "N")]
    val_limit: Option<usize>,
    /// The fine-tuned checkpoint (safetensors, config in its metadata).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Checkpoint: the original needle.pkl or a safetensors file.
    #[arg(long)]
    checkpoint: PathBuf,
    /// SentencePiece `.model` file (or a Hugging Face `tokenizer.json`).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Examples, JSON Lines in Needle's fine-tuning format: `query`, `tools` (a JSON list, or a
    /// string holding one; optional with --tools) and `answers` (the expected calls, `[]` for none).
    #[arg(long)]
    data: PathBuf,
    /// The app's fixed tool list (a path, or inline JSON starting with `[`): used for every
    /// example instead of its own.
    #[arg(long)]
    tools: Option<String>,
    /// Fold the tools side into constants; the default follows the checkpoint.
    #[arg(long, value_enum)]
    fold: Option<FoldArg>,
    /// Weights as a library built with `--weights` computes them (default: the checkpoint's own).
    #[arg(long, value_name = "f32|f16|int8|int4")]
    weights: Option<Precision>,
    #[arg(long, default_value_t = DEFAULT_MAX_GEN_LEN)]
    max_gen_len: usize,
    #[arg(long, value_name = "N")]
    max_query_tokens: Option<usize>,
    /// `reference` (the original grammar) or `strict` (valid calls under the schemas).
    #[arg(long, value_name = "reference|strict", default_value = "reference")]
    grammar: GrammarKind,
    /// Also run with one option changed and report the agreement example by example
    /// (repeatable): fold=none|tools, weights=f32|f16|int8|int4, grammar=reference|strict.
    #[arg(long, value_name = "KEY=VALUE")]
    compare: Vec<needlec::eval::Setting>,
    /// Write the full report as JSON.
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML page (inline SVG plots, nothing fetched).
    #[arg(long, value_name = "PATH")]
    html: Option<PathBuf>,
    /// Fail (exit status 3) when exact-match accuracy is below X (a share, 0 to 1).
    #[arg(long, value_name = "X")]
    min_accuracy: Option<f64>,
    /// Fail (exit status 3) when the agreement with any --compare is below X.
    #[arg(long, value_name = "X")]
    min_agreement: Option<f64>,
    /// Fail (exit status 3) when the share of valid calls is below X.
    #[arg(long, value_name = "X")]
    min_valid: Option<f64>,
    /// Report the confidence threshold that reaches this precision with the most coverage.
    #[arg(long, value_name = "X")]
    target_precision: Option<f64>,
    /// Fail on any bad data line instead of reporting and skipping it.
    #[arg(long)]
    strict_data: bool,
    /// Evaluate only the first N usable examples.
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

/// Exit status when the evaluation ran but a `--min-*` gate was missed.
const GATE_MISSED: u8 = 3;

#[derive(Subcommand)]
enum Command {
    /// Answer one query: prints the tool-call JSON exactly as the reference returns it.
    Run {
        #[command(flatten)]
        model: ModelArgs,
        /// The user's query.
        #[arg(long)]
        query: OsString,
        /// Also print a second line of JSON: the confidence in [0, 1], the first call's tool and
        /// every candidate signal (docs/spec.md, "Confidence").
        #[arg(long)]
        confidence: bool,
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
        /// A smaller N needs a smaller workspace. Default: as many as the model allows. Needle 3:
        /// the ids of the query part (its markup included), longer ones refused; default 512,
        /// or what the model's positions leave.
        #[arg(long, value_name = "N")]
        max_query_tokens: Option<usize>,
        /// Prefix of every exported symbol and macro.
        #[arg(long, default_value = "needle")]
        name: String,
        /// `NAME_call_ex` sets `escalate` when the answer's confidence is below T (0 to 1; `eval
        /// --target-precision` suggests one). Default 0: never escalate.
        #[arg(long, value_name = "T", default_value_t = 0.0)]
        escalate_below: f64,
        /// Opt-in, int8/int4 only: also quantize each matrix product's input rows (int8 range,
        /// per group of 32) and multiply with integer dot products. Faster decoding, but the
        /// OUTPUTS MAY DIFFER FROM THE REFERENCE'S (the README gives the measured agreement).
        #[arg(long)]
        quantize_activations: bool,
        /// `reference`: the original grammar (tool names and argument keys only); `strict`: the
        /// output is a valid call list under the tool schemas, closed within max_gen_len, as
        /// `needlec run --grammar strict`.
        #[arg(long, value_name = "reference|strict", default_value = "reference")]
        grammar: GrammarKind,
        /// Run up to N consecutive forced tokens (the grammar allowed exactly one) through the
        /// decoder as one multi-row step, each weight block read once for all of them (1 to 64;
        /// 1: one row per step). The answer is the same for every N.
        #[arg(long, value_name = "N", default_value_t = needlec::build::MAX_FORCED_ROWS,
              value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
        max_forced_rows: usize,
        /// What to write (repeatable); default: staticlib and header.
        #[arg(long, value_enum)]
        emit: Vec<EmitArg>,
        /// Print where the library's bytes go (embedding, each layer's weights, folded K/V,
        /// tokenizer and grammar tables, code), the workspace's regions and the build options,
        /// and write them as `NAME.report.json` beside the library.
        #[arg(long)]
        report: bool,
        #[arg(long)]
        out_dir: PathBuf,
        /// Needle 3 only: the system turn's text, fixed in the library (none by default).
        #[arg(long, value_name = "TEXT")]
        system: Option<String>,
        /// Needle 3 only: build the model at this ladder depth (2 to its layer count), as the
        /// package slices it (docs/needle3.md, "Ladder slicing").
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
    },
    /// List the supported target triples, their CPU levels and ISA features.
    Targets,
    /// Measure a checkpoint, tool list and build options on examples: accuracy, valid calls,
    /// confidence quality, latency, and agreement with other options; gates for CI.
    Eval(EvalArgs),
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
    /// Fine-tune a checkpoint on tool-calling examples (CPU): `--isolate-tools` makes folding
    /// the result's own semantics.
    Finetune(FinetuneArgs),
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
        Ok(code) => code,
        // The reader went away (`needlec trace | head`): nothing left to say, and no one to say it
        // to; end quietly like other command-line tools.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Writes `text` to standard output and flushes it, so that a closed pipe or a full disk is an
/// error here (not a panic in `println!`, nor lost at exit).
fn out(text: impl std::fmt::Display) -> Result<()> {
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    write!(lock, "{text}")
        .and_then(|()| lock.flush())
        .context("writing to standard output")
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

fn real_main() -> Result<ExitCode> {
    match Cli::parse().command {
        Command::Eval(args) => return eval(args),
        Command::Finetune(args) => finetune(args)?,
        Command::Run {
            model,
            query,
            confidence,
        } => {
            let query = utf8_query(query)?;
            check_max_gen_len(model.max_gen_len)?;
            if needle3::is_needle3_checkpoint(&model.checkpoint) {
                return run_needle3(&model, &query, confidence);
            }
            let engine = load_engine(&model)?;
            let generation = engine.generate(&query, model.max_gen_len)?;
            out(format_args!("{}\n", generation.output))?;
            if confidence {
                out(format_args!("{}\n", confidence_json(&engine, &generation)))?;
            }
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
            escalate_below,
            quantize_activations,
            grammar,
            max_forced_rows,
            emit,
            report,
            out_dir,
            system,
            layers,
        } => {
            let is_needle3 = needle3::is_needle3_checkpoint(&checkpoint);
            anyhow::ensure!(
                is_needle3 || (system.is_none() && layers.is_none()),
                "--system and --layers are for Needle 3 checkpoints; {} is a Needle v1 checkpoint \
                 (its prompt has no system turn and its depth is fixed): drop them",
                checkpoint.display()
            );
            let mut emit: Vec<Emit> = emit
                .into_iter()
                .map(|e| match e {
                    EmitArg::Staticlib => Emit::Staticlib,
                    EmitArg::Obj => Emit::Obj,
                    EmitArg::Ir => Emit::Ir,
                    EmitArg::Header => Emit::Header,
                    EmitArg::Rust => Emit::Rust,
                    EmitArg::Report => Emit::Report,
                    EmitArg::Xcframework => Emit::Xcframework,
                })
                .collect();
            if emit.iter().all(|e| *e == Emit::Report) {
                emit.extend([Emit::Staticlib, Emit::Header]);
            }
            if report {
                emit.push(Emit::Report);
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
                escalate_below,
                quantize_activations,
                grammar,
                max_forced_rows,
                emit,
                out_dir,
            };
            let report = if is_needle3 {
                let n3 = needle3::Needle3BuildOptions {
                    system: system.unwrap_or_default(),
                    layers,
                };
                with_spinner("building", || needle3::build(&opts, &n3))?
            } else {
                with_spinner("building", || build::build(&opts))?
            };
            if let Some(warning) = report.fold_warning {
                eprintln!("warning: {warning}");
            }
            if let Some(notice) = report.weights_notice {
                eprintln!("note: {notice}");
            }
            if let Some(warning) = report.room_warning {
                eprintln!("warning: {warning}");
            }
            eprintln!("{}", report.summary);
            if let Some(table) = &report.size_report {
                print!("{table}");
            }
            for path in report.written {
                eprintln!("wrote {}", path.display());
            }
        }
        Command::Targets => {
            for t in needle_targets::supported() {
                let target = needle_targets::Target::from_triple(t.triple)?;
                out(format_args!(
                    "{:<30} {}\n{:<30} --cpu: {}\n{:<30} --features: {}\n",
                    t.triple,
                    t.note,
                    "",
                    needle_targets::cpus(target.arch).join(", "),
                    "",
                    needle_targets::known_features(target.arch).join(", ")
                ))?;
            }
        }
        Command::Trace {
            model,
            query,
            answer,
        } => {
            let query = utf8_query(query)?;
            check_max_gen_len(model.max_gen_len)?;
            if needle3::is_needle3_checkpoint(&model.checkpoint) {
                let engine = load_needle3(&model)?;
                let trace =
                    needle3::trace(&engine, &query, answer.as_deref(), model.max_gen_len - 1)?;
                out(format_args!("{trace}\n"))?;
                return Ok(ExitCode::SUCCESS);
            }
            let engine = load_engine(&model)?;
            let generation = match answer {
                Some(answer) => engine.forced(&query, &engine.tokenizer.encode(&answer))?,
                None => engine.generate(&query, model.max_gen_len)?,
            };
            let confidence = confidence_json(&engine, &generation);
            out(format_args!("{}\n", trace_json(&generation, confidence)))?;
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
                writeln!(out, "{}", serde_json::to_string(&tokenizer.encode(&text))?)
                    .context("writing to standard output")?;
            }
            out.flush().context("writing to standard output")?;
        }
        Command::Tokenizer(TokenizerCommand::Export { tokenizer, output }) => {
            let tok = frontend::load_tokenizer(&tokenizer)?;
            let json = tok
                .to_hf_json()
                .with_context(|| format!("exporting {}", tokenizer.display()))?;
            std::fs::write(&output, json)
                .with_context(|| format!("writing {}", output.display()))?;
        }
        Command::Inspect { path } if needle3::is_needle3_checkpoint(&path) => {
            out(needle3::inspect_report(&path)?)?;
        }
        Command::Inspect { path } => {
            let ckpt = with_spinner("loading checkpoint", || frontend::load_checkpoint_at(&path))?;
            out(needlec::load::inspect_report(&ckpt))?;
        }
        Command::Convert { input, output } => {
            let ckpt = with_spinner("loading checkpoint", || {
                frontend::load_checkpoint_at(&input)
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
    Ok(ExitCode::SUCCESS)
}

/// Draws the fine-tune's progress bar: loss, token accuracy and time per step.
struct FinetuneBar(indicatif::ProgressBar);

impl needlec::finetune::Progress for FinetuneBar {
    fn start(&self, total_steps: usize) {
        self.0.set_length(total_steps as u64);
        self.0.set_position(0);
        self.0.set_style(
            indicatif::ProgressStyle::with_template(
                "finetune [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
    }

    fn step(&self, step: usize, loss: f64, token_accuracy: f64, seconds: f64) {
        self.0.set_position(step as u64);
        self.0.set_message(format!(
            "loss {loss:.4} tokens {:.1}% {seconds:.2} s/step",
            token_accuracy * 100.0
        ));
    }

    fn line(&self, text: &str) {
        // `println` shows nothing while the bar is hidden (stderr is not a terminal).
        if self.0.is_hidden() {
            eprintln!("{text}");
        } else {
            self.0.println(text);
        }
    }

    fn phase(&self, what: &str) {
        self.0.set_message(what.to_string());
    }
}

fn finetune(args: FinetuneArgs) -> Result<()> {
    if let Some(p) = args.qat {
        anyhow::ensure!(
            p.is_quantized(),
            "--qat {p}: quantization-aware training is for int4 or int8"
        );
    }
    for (given, flag) in [
        (args.distill_weight.is_some(), "--distill-weight"),
        (args.distill_temperature.is_some(), "--distill-temperature"),
    ] {
        anyhow::ensure!(
            !given || args.distill,
            "{flag} tunes how --distill learns from the stock model, and --distill is not given; add --distill or drop {flag}"
        );
    }
    let defaults = needlec::finetune::Distillation::default();
    let opts = needlec::finetune::FinetuneOptions {
        checkpoint: args.checkpoint,
        tokenizer: args.tokenizer,
        data: args.data,
        val: args.val,
        out: args.out,
        isolate_tools: args.isolate_tools,
        distill: args.distill.then(|| needlec::finetune::Distillation {
            weight: args.distill_weight.unwrap_or(defaults.weight),
            temperature: args.distill_temperature.unwrap_or(defaults.temperature),
        }),
        augment: args.augment,
        qat: args.qat,
        lora_rank: args.lora_rank,
        steps: args.steps,
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        ema: args.ema,
        clip: args.clip,
        warmup: args.warmup,
        seed: args.seed,
        val_every: args.val_every,
        val_limit: args.val_limit,
        ..Default::default()
    };
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    let result = needlec::finetune::run(&opts, &FinetuneBar(bar.clone()));
    bar.finish_and_clear();
    let summary = result?;
    eprintln!(
        "trained {} steps on {} examples ({:.3} s/step), last loss {:.4}; wrote {} (the weights after step {})",
        summary.steps,
        summary.examples,
        summary.seconds_per_step,
        summary.final_loss,
        opts.out.display(),
        summary.kept_step
    );
    Ok(())
}

fn eval(args: EvalArgs) -> Result<ExitCode> {
    let shares = [
        ("--min-accuracy", args.min_accuracy),
        ("--min-agreement", args.min_agreement),
        ("--min-valid", args.min_valid),
        ("--target-precision", args.target_precision),
    ];
    for (flag, value) in shares {
        if let Some(v) = value {
            anyhow::ensure!(
                (0.0..=1.0).contains(&v),
                "{flag} {v} is not a share: give a number from 0 to 1 (0.9 for 90%)"
            );
        }
    }
    anyhow::ensure!(
        args.min_agreement.is_none() || !args.compare.is_empty(),
        "--min-agreement needs at least one --compare KEY=VALUE to agree with (e.g. --compare fold=none)"
    );
    let opts = needlec::eval::EvalOptions {
        checkpoint: args.checkpoint,
        tokenizer: args.tokenizer,
        data: args.data,
        tools: args.tools,
        fold: args.fold.map(fold_mode),
        weights: args.weights,
        max_gen_len: args.max_gen_len,
        max_query_tokens: args.max_query_tokens,
        grammar: args.grammar,
        compare: args.compare,
        strict_data: args.strict_data,
        limit: args.limit,
        target_precision: args.target_precision,
    };
    // Drawn on stderr, and only when it is a terminal.
    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} evaluating [{bar:40}] {pos}/{len} ({eta} left)",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    let report = needlec::eval::evaluate(&opts, &progress);
    progress.finish_and_clear();
    let report = report?;
    for bad in &report.bad_lines {
        eprintln!("warning: {}: skipped {bad}", report.data);
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    out(report.table())?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing the JSON report {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, needlec::eval::html::page(&report))
            .with_context(|| format!("writing the HTML report {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    let gates = needlec::eval::report::Gates {
        min_accuracy: args.min_accuracy,
        min_agreement: args.min_agreement,
        min_valid: args.min_valid,
    };
    let missed = gates.check(&report);
    for m in &missed {
        eprintln!("gate missed: {m}");
    }
    Ok(if missed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(GATE_MISSED)
    })
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

/// `run` with a Needle 3 checkpoint: the calls on the first line (as for v1); with
/// `--confidence`, a second line with the reasoning, whether the calls parsed, the confidence
/// head's score and the router head's logits.
fn run_needle3(model: &ModelArgs, query: &str, details: bool) -> Result<ExitCode> {
    let engine = load_needle3(model)?;
    let generation = engine
        .generate(query, model.max_gen_len - 1)
        .map_err(needle3::Needle3Error::Engine)?;
    out(format_args!("{}\n", generation.calls))?;
    if details {
        out(format_args!("{}\n", needle3::details_json(&generation)))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn load_needle3(model: &ModelArgs) -> Result<needle_runtime::needle3::engine::Engine> {
    anyhow::ensure!(
        model.weights.is_none() && model.max_query_tokens.is_none(),
        "--weights and --max-query-tokens are not yet supported for Needle 3 checkpoints \
         (the runtime computes with the checkpoint's dequantized float32 weights): drop them"
    );
    let opts = needle3::RunOptions {
        checkpoint: model.checkpoint.clone(),
        tokenizer: model.tokenizer.clone(),
        tools: model.tools.clone(),
        system: model.system.clone().unwrap_or_default(),
        layers: model.layers,
        fold: model.fold.map(fold_mode) != Some(FoldMode::None),
        strict: model.grammar == GrammarKind::Strict,
    };
    Ok(with_spinner(
        "loading checkpoint, tokenizer and tools",
        || needle3::load_engine(&opts),
    )?)
}

fn load_engine(args: &ModelArgs) -> Result<Engine> {
    anyhow::ensure!(
        args.system.is_none() && args.layers.is_none(),
        "--system and --layers are for Needle 3 checkpoints; {} is a Needle v1 checkpoint \
         (its prompt has no system turn and its depth is fixed): drop them",
        args.checkpoint.display()
    );
    let options = frontend::ModelOptions {
        fold: args.fold.map(fold_mode),
        weights: args.weights,
        max_query_tokens: args.max_query_tokens,
        grammar: args.grammar,
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

/// `{"confidence", "tool", "signals"}`: the call's confidence, its first call's tool (the
/// original name; null for none) and every candidate signal.
fn confidence_json(engine: &Engine, g: &Generation) -> serde_json::Value {
    let c = engine.confidence(g);
    let signals: serde_json::Map<String, serde_json::Value> = c
        .signals
        .named()
        .into_iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    serde_json::json!({
        "confidence": c.value,
        "tool": c.tool.map(|t| engine.tools.name_map[t].1.clone()),
        "signals": signals,
    })
}

fn trace_json(g: &Generation, confidence: serde_json::Value) -> String {
    let steps: Vec<serde_json::Value> = g
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "top": s.top.iter().map(|&(id, logit)| serde_json::json!([id, logit])).collect::<Vec<_>>(),
                "grammar_active": s.grammar_active,
                "allowed": s.allowed,
                "next": s.next,
                "prob": s.prob,
                "margin": s.margin,
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
        "confidence": confidence,
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
