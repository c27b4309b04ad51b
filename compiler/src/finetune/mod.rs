//! `needlec finetune`: trains a checkpoint on tool-calling examples, on the CPU, with candle.
//!
//! [`model`] is the training graph (the runtime's forward pass over tensors, with autograd),
//! [`data`] turns the examples into teacher-forced sequences, [`augment`] varies them per epoch
//! (`--augment`), and [`run`] is the loop: AdamW with linear warmup and cosine decay, gradient
//! clipping, a fixed seed (the same inputs give the same bytes), validation loss and exact-match
//! (greedy decoding through the runtime, folded when `--isolate-tools`) every `--val-every` steps
//! with the best checkpoint kept, and a stop at the first non-finite loss that keeps the last
//! good checkpoint.

pub mod augment;
pub mod data;
pub mod model;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use needle_runtime::config::ToolAttention;
use needle_runtime::decode::{FoldMode, GrammarKind};
use needle_runtime::model::Model;
use needle_runtime::quant::Precision;
use needle_runtime::tokenizer::Tokenizer;

use crate::eval::{self, metrics, Dataset, EvalError};
use crate::frontend::{self, FrontendError};
use crate::load::{self, LoadError};
pub use model::Distillation;
use model::{Batch, Sequence, SplitMix, TrainModel};

/// Why fine-tuning could not run or stopped.
#[derive(Debug, thiserror::Error)]
pub enum FinetuneError {
    #[error(transparent)]
    Frontend(#[from] FrontendError),
    #[error(transparent)]
    Eval(EvalError),
    #[error(transparent)]
    Load(LoadError),
    #[error(
        "{what} file {}: every line must be a usable example, and these are not{hint}:\n{lines}",
        .path.display()
    )]
    BadData {
        what: &'static str,
        path: PathBuf,
        hint: &'static str,
        lines: String,
    },
    #[error(
        "{what} file {} holds no example; give JSON Lines with \"query\", \"tools\" and \"answers\"",
        .path.display()
    )]
    Empty { what: &'static str, path: PathBuf },
    #[error(
        "cannot write the output {}: {cause}; pass an --out path in a writable directory",
        .path.display()
    )]
    Output {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{0}")]
    Options(String),
    #[error("{what} is {value} at step {step}: training diverged (try a lower --lr); {kept}")]
    NonFinite {
        what: &'static str,
        step: usize,
        value: f64,
        kept: String,
    },
    #[error("training computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl From<LoadError> for FinetuneError {
    fn from(e: LoadError) -> Self {
        FinetuneError::Load(e)
    }
}

/// What `needlec finetune` was asked to do.
#[derive(Clone, Debug)]
pub struct FinetuneOptions {
    pub checkpoint: PathBuf,
    pub tokenizer: PathBuf,
    pub data: PathBuf,
    pub val: Option<PathBuf>,
    pub out: PathBuf,
    pub isolate_tools: bool,
    /// `--distill`, and how the teacher's distributions enter the loss (`--distill-weight`,
    /// `--distill-temperature`).
    pub distill: Option<Distillation>,
    /// Vary the argument values of half the labelled examples every epoch ([`augment`]).
    pub augment: bool,
    pub qat: Option<Precision>,
    pub lora_rank: Option<usize>,
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    pub batch_size: usize,
    pub lr: f64,
    /// Validate and keep an exponential moving average of the weights with this decay per step
    /// instead of the weights themselves (`--ema`).
    pub ema: Option<f64>,
    pub weight_decay: f64,
    pub clip: f64,
    pub warmup: Option<usize>,
    pub seed: u64,
    pub val_every: usize,
    /// Validate on the first N usable `--val` examples only.
    pub val_limit: Option<usize>,
    pub max_gen_len: usize,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        FinetuneOptions {
            checkpoint: PathBuf::new(),
            tokenizer: PathBuf::new(),
            data: PathBuf::new(),
            val: None,
            out: PathBuf::new(),
            isolate_tools: false,
            distill: None,
            augment: false,
            qat: None,
            lora_rank: None,
            steps: None,
            epochs: None,
            batch_size: 16,
            lr: 3e-4,
            ema: None,
            weight_decay: 0.01,
            clip: 1.0,
            warmup: None,
            seed: 0,
            val_every: 100,
            val_limit: None,
            max_gen_len: 64,
        }
    }
}

/// One validation: at which step, the teacher-forced loss and the greedy exact-match.
#[derive(Clone, Debug, PartialEq)]
pub struct Validation {
    pub step: usize,
    pub seconds: f64,
    pub loss: f64,
    pub exact_match: f64,
    /// The share of validation examples on which the model (folded under `--isolate-tools`)
    /// answers exactly as the stock model does in exact mode: how lossless folding has become.
    pub agreement: f64,
}

/// What a finished run reports.
#[derive(Clone, Debug)]
pub struct Summary {
    pub steps: usize,
    pub examples: usize,
    pub final_loss: f64,
    pub validations: Vec<Validation>,
    /// The step whose weights `--out` holds.
    pub kept_step: usize,
    pub seconds_per_step: f64,
}

/// How the loop reports progress (the CLI draws a bar; tests pass [`Quiet`]).
pub trait Progress {
    fn start(&self, _total_steps: usize) {}
    fn step(&self, _step: usize, _loss: f64, _token_accuracy: f64, _seconds: f64) {}
    fn line(&self, _text: &str) {}
    fn phase(&self, _what: &str) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// The learning rate at `step` (0-based): linear warmup over `warmup` steps, then cosine decay
/// to zero at `total`.
pub fn learning_rate(peak: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Checks that `path` can be written without clobbering it: opened for appending (created if
/// absent, then removed again).
fn check_writable(path: &Path) -> Result<(), FinetuneError> {
    let existed = path.exists();
    let result = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path);
    match result {
        Ok(_) => {
            if !existed {
                let _ = std::fs::remove_file(path);
            }
            Ok(())
        }
        Err(cause) => Err(FinetuneError::Output {
            path: path.to_path_buf(),
            cause,
        }),
    }
}

/// Scales every gradient so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[Var],
    max_norm: f64,
) -> Result<f64, FinetuneError> {
    let mut total = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm && norm.is_finite() {
        let scale = max_norm / norm;
        for v in vars {
            if let Some(g) = grads.get(v) {
                let scaled = (g * scale)?;
                grads.insert(v, scaled);
            }
        }
    }
    Ok(norm)
}

/// Mean teacher-forced loss over `seqs`, in batches.
fn mean_loss(
    model: &TrainModel,
    seqs: &[Sequence],
    batch_size: usize,
    isolate: bool,
) -> Result<f64, FinetuneError> {
    let mut sum = 0.0;
    let mut count = 0usize;
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let batch = Batch::new(&refs, isolate, model.dtype(), model.device())?;
        let (loss, _) = model.loss(&batch)?;
        let loss = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        sum += loss * batch.n_targets as f64;
        count += batch.n_targets;
    }
    Ok(sum / count.max(1) as f64)
}

/// Greedy exact-match of `ckpt` on `dataset` through the runtime, folded or not.
pub fn exact_match(
    ckpt: &needle_runtime::checkpoint::Checkpoint,
    tokenizer: &Tokenizer,
    dataset: &Dataset,
    fold: FoldMode,
    max_gen_len: usize,
) -> Result<f64, FinetuneError> {
    let outputs = greedy_outputs(ckpt, Precision::F32, tokenizer, dataset, fold, max_gen_len)?;
    Ok(exact_share(&outputs, dataset))
}

/// The share of `dataset`'s examples whose output parses to its expected calls.
fn exact_share(outputs: &[Option<String>], dataset: &Dataset) -> f64 {
    let exact = outputs
        .iter()
        .zip(&dataset.examples)
        .filter(|(o, p)| {
            let parsed = o.as_ref().and_then(|t| serde_json::from_str(t).ok());
            metrics::score_calls(parsed.as_ref(), &p.example.answers).exact
        })
        .count();
    metrics::ratio(exact, outputs.len())
}

/// The share of examples on which two runs' outputs are the same text (a failed decode agrees
/// with nothing).
fn agreement(a: &[Option<String>], b: &[Option<String>]) -> f64 {
    let same = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.is_some() && x == y)
        .count();
    metrics::ratio(same, a.len())
}

/// `ckpt`'s greedy output text on every example of `dataset` through the runtime, folded or
/// not, with its weights stored at `precision`; `None` where decoding failed.
fn greedy_outputs(
    ckpt: &needle_runtime::checkpoint::Checkpoint,
    precision: Precision,
    tokenizer: &Tokenizer,
    dataset: &Dataset,
    fold: FoldMode,
    max_gen_len: usize,
) -> Result<Vec<Option<String>>, FinetuneError> {
    let model = Model::from_checkpoint_as(ckpt, precision).map_err(|e| {
        FinetuneError::Options(format!("the trained weights do not form a model: {e}"))
    })?;
    let outcomes = eval::answer_all(
        model,
        tokenizer.clone(),
        dataset,
        fold,
        max_gen_len,
        None,
        GrammarKind::Reference,
        false,
        &|| {},
    )
    .map_err(FinetuneError::Eval)?;
    Ok(outcomes.into_iter().map(|o| o.output.ok()).collect())
}

/// Sets `vars` to `values` and returns what they held.
fn swap_weights(vars: &[Var], values: &[Tensor]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter()
        .zip(values)
        .map(|(v, t)| {
            let old = snapshot(v)?;
            v.set(t)?;
            Ok(old)
        })
        .collect()
}

/// A copy of `var`'s current value that is no part of any autograd graph. `Tensor::copy` of a
/// variable records the variable as its source, and arithmetic on such a copy records the copy:
/// the moving average, updated from itself every step, then held every earlier average alive
/// (measured: the resident memory of a 2,500-step `--ema` run grew by 7 MB a step and ended
/// killed for memory).
pub fn snapshot(var: &Var) -> candle_core::Result<Tensor> {
    var.as_tensor().detach().copy()
}

/// One step of `--ema`: `average = decay * average + (1 - decay) * var`, outside any autograd
/// graph (see [`snapshot`]).
pub fn update_average(average: &mut [Tensor], vars: &[Var], decay: f64) -> candle_core::Result<()> {
    for (a, v) in average.iter_mut().zip(vars) {
        *a = ((&*a * decay)? + (v.as_tensor().detach() * (1.0 - decay))?)?;
    }
    Ok(())
}

/// One epoch's batches: a seeded shuffle, then within windows of 32 batches the examples sorted
/// by encoder length (so a batch pads little), then the batches shuffled.
fn epoch_batches(train: &[Sequence], batch_size: usize, rng: &mut SplitMix) -> Vec<Vec<usize>> {
    fn shuffle<T>(v: &mut [T], rng: &mut SplitMix) {
        for i in (1..v.len()).rev() {
            v.swap(i, rng.below(i + 1));
        }
    }
    let mut order: Vec<usize> = (0..train.len()).collect();
    shuffle(&mut order, rng);
    let mut batches = Vec::new();
    for window in order.chunks_mut(batch_size * 32) {
        window.sort_by_key(|&i| (train[i].enc_ids.len(), i));
        batches.extend(window.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, rng);
    batches
}

/// `--augment`'s epochs: the training sequences with a share of the labelled ones varied.
struct EpochVariants<'a> {
    augmenter: augment::Augmenter,
    set: &'a Dataset,
    tool_ids: Vec<Vec<u32>>,
    tokenizer: &'a Tokenizer,
}

impl<'a> EpochVariants<'a> {
    fn new(set: &'a Dataset, tokenizer: &'a Tokenizer) -> Result<Self, FinetuneError> {
        let labelled = set.examples.iter().map(|p| &p.example);
        Ok(EpochVariants {
            augmenter: augment::Augmenter::new(labelled.filter(|e| e.labelled)),
            set,
            tool_ids: data::tool_ids_of(set, tokenizer)?,
            tokenizer,
        })
    }

    /// One epoch's sequences: `train[i]`, or with probability [`augment::VARIED_SHARE`] a
    /// variant of its example when `sources[i]` names one.
    fn epoch(
        &self,
        train: &[Sequence],
        sources: &[Option<usize>],
        rng: &mut SplitMix,
    ) -> Vec<Sequence> {
        train
            .iter()
            .zip(sources)
            .map(|(seq, source)| {
                let Some(i) = *source else {
                    return seq.clone();
                };
                if rng.unit() >= augment::VARIED_SHARE {
                    return seq.clone();
                }
                let p = &self.set.examples[i];
                match self
                    .augmenter
                    .vary(&p.example.query, &p.example.answers, rng)
                {
                    Some((query, answers)) => data::labelled_sequence(
                        self.tokenizer,
                        &query,
                        &answers,
                        &self.set.tool_sets[p.set],
                        &self.tool_ids[p.set],
                    ),
                    None => seq.clone(),
                }
            })
            .collect()
    }
}

/// Runs the whole fine-tune and writes `--out`.
pub fn run(opts: &FinetuneOptions, progress: &dyn Progress) -> Result<Summary, FinetuneError> {
    if !(opts.lr.is_finite() && opts.lr > 0.0) {
        return Err(FinetuneError::Options(format!(
            "--lr {} is not a positive number",
            opts.lr
        )));
    }
    if opts.batch_size == 0 {
        return Err(FinetuneError::Options(
            "--batch-size must be at least 1".into(),
        ));
    }
    if opts.steps == Some(0) || opts.epochs == Some(0) {
        return Err(FinetuneError::Options(
            "--steps and --epochs must be at least 1".into(),
        ));
    }
    if let Some(d) = opts.ema {
        if !(d > 0.0 && d < 1.0) {
            return Err(FinetuneError::Options(format!(
                "--ema {d}: the decay must be between 0 and 1 exclusive (0.995 averages about the last 200 steps)"
            )));
        }
    }
    if let Some(Distillation {
        weight,
        temperature,
    }) = opts.distill
    {
        if !(0.0..=1.0).contains(&weight) {
            return Err(FinetuneError::Options(format!(
                "--distill-weight {weight}: the teacher's share of the loss must be between 0 and 1 (1: the teacher's distributions alone; 0: the labels alone)"
            )));
        }
        if !(temperature.is_finite() && temperature > 0.0) {
            return Err(FinetuneError::Options(format!(
                "--distill-temperature {temperature} is not a positive number (1 compares the distributions as they are; 2, the default, softens both)"
            )));
        }
    }
    if opts.lora_rank == Some(0) {
        return Err(FinetuneError::Options(
            "--lora-rank must be at least 1".into(),
        ));
    }
    if opts.val_every == 0 {
        return Err(FinetuneError::Options(
            "--val-every must be at least 1".into(),
        ));
    }
    check_writable(&opts.out)?;
    progress.phase("loading");
    let ckpt = frontend::load_checkpoint_at(&opts.checkpoint)?;
    // The runtime's own checks: a checkpoint it cannot run cannot be trained either.
    let stock = Model::from_checkpoint(&ckpt).map_err(|cause| FrontendError::Model {
        path: opts.checkpoint.clone(),
        cause,
    })?;
    let tokenizer = frontend::load_tokenizer(&opts.tokenizer)?;
    frontend::check_vocab(&tokenizer, &opts.tokenizer, ckpt.config.vocab_size)?;

    let train_set = data::read_dataset(&opts.data, &tokenizer, opts.distill.is_none(), "--data")?;
    // Labelled lines train on their answers; under --distill the lines without answers are
    // labelled by the stock model's greedy exact-mode output.
    let (mut train, mut sources): (Vec<Sequence>, Vec<Option<usize>>) =
        data::sequences(&train_set, &tokenizer)?
            .into_iter()
            .map(|(seq, i)| (seq, Some(i)))
            .unzip();
    if opts.distill.is_some() && train.len() < train_set.examples.len() {
        progress.phase("labelling the lines without answers with the stock model (--distill)");
        let (seqs, dropped) = data::distilled(&train_set, &stock, &tokenizer, &|| {})?;
        if dropped > 0 {
            progress.line(&format!(
                "--distill: {dropped} example(s) left out: the stock model's answer did not end within {} tokens",
                data::DISTILL_MAX_GEN_LEN
            ));
        }
        sources.extend(seqs.iter().map(|_| None));
        train.extend(seqs);
    }
    if train.is_empty() {
        return Err(FinetuneError::Empty {
            what: "--data (after --distill)",
            path: opts.data.clone(),
        });
    }
    let augmenter = if opts.augment {
        if sources.iter().all(Option::is_none) {
            return Err(FinetuneError::Options(
                "--augment varies labelled examples, and no line of --data has \"answers\"; label some lines or drop --augment".into(),
            ));
        }
        Some(EpochVariants::new(&train_set, &tokenizer)?)
    } else {
        None
    };
    drop(stock);
    let val = match &opts.val {
        Some(path) => {
            let mut set = data::read_dataset(path, &tokenizer, true, "--val")?;
            if let Some(limit) = opts.val_limit {
                set.examples.truncate(limit.max(1));
            }
            let seqs: Vec<Sequence> = data::sequences(&set, &tokenizer)?
                .into_iter()
                .map(|(seq, _)| seq)
                .collect();
            Some((set, seqs))
        }
        None => None,
    };

    let per_epoch = train.len().div_ceil(opts.batch_size);
    let total = match (opts.steps, opts.epochs) {
        (Some(steps), _) => steps,
        (None, Some(epochs)) => per_epoch * epochs,
        (None, None) => per_epoch,
    };
    let warmup = opts.warmup.unwrap_or((total / 10).min(100)).min(total);

    let mut out_config = ckpt.config.clone();
    out_config.tool_attention = if opts.isolate_tools {
        ToolAttention::Isolated
    } else {
        ToolAttention::Full
    };
    let fold = if opts.isolate_tools {
        FoldMode::Tools
    } else {
        FoldMode::None
    };

    let device = Device::Cpu;
    let mut model = TrainModel::from_checkpoint(&ckpt, DType::F32, &device)?;
    if let Some(rank) = opts.lora_rank {
        model = model.with_lora(rank, opts.seed)?;
    }
    if let Some(p) = opts.qat {
        model = model.with_qat(p);
    }
    // Under --distill the stock model in exact mode (full attention, float32 weights, no
    // adapters) is also the teacher whose next-token distributions the student matches: soft
    // targets carry what the teacher's greedy labels drop (how close the runners-up were), and
    // measured on dev.jsonl they give a point more folded exact match than the labels alone.
    let teacher = match opts.distill {
        Some(how) => Some((
            TrainModel::from_checkpoint(&ckpt, DType::F32, &device)?,
            how,
        )),
        None => None,
    };
    let (decay, no_decay) = model.trainable();
    let all_trainable: Vec<Var> = decay.iter().chain(&no_decay).cloned().collect();
    let mut opt_decay = AdamW::new(
        decay,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let mut opt_plain = AdamW::new(
        no_decay,
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: 0.0,
            ..ParamsAdamW::default()
        },
    )?;

    let started = Instant::now();
    let mut validations = Vec::new();
    // (exact match, -loss, step) of the checkpoint in --out.
    let mut best: Option<(f64, f64, usize)> = None;
    let save = |model: &TrainModel, path: &Path| -> Result<(), FinetuneError> {
        let ckpt = model.to_checkpoint(&out_config)?;
        load::save_safetensors(&ckpt, path)?;
        Ok(())
    };
    // The stock model's exact-mode answers, what each validation's agreement is measured against.
    let stock_outputs = match &val {
        Some((set, _)) => greedy_outputs(
            &ckpt,
            Precision::F32,
            &tokenizer,
            set,
            FoldMode::None,
            opts.max_gen_len,
        )?,
        None => Vec::new(),
    };
    let validate = |model: &TrainModel, step: usize| -> Result<Option<Validation>, FinetuneError> {
        let Some((set, seqs)) = &val else {
            return Ok(None);
        };
        let loss = mean_loss(model, seqs, opts.batch_size, opts.isolate_tools)?;
        let ckpt = model.to_checkpoint(&out_config)?;
        // Under --qat the model is scored as its quantized build will run.
        let precision = opts.qat.unwrap_or(Precision::F32);
        let outputs = greedy_outputs(&ckpt, precision, &tokenizer, set, fold, opts.max_gen_len)?;
        Ok(Some(Validation {
            step,
            seconds: started.elapsed().as_secs_f64(),
            loss,
            exact_match: exact_share(&outputs, set),
            agreement: agreement(&outputs, &stock_outputs),
        }))
    };

    progress.start(total);
    if let Some(v) = validate(&model, 0)? {
        progress.line(&format!(
            "step 0 (as loaded): validation loss {:.4}, exact match {:.1}%, agreement with the stock exact mode {:.1}%",
            v.loss,
            v.exact_match * 100.0,
            v.agreement * 100.0
        ));
        save(&model, &opts.out)?;
        best = Some((v.exact_match, -v.loss, 0));
        validations.push(v);
    }
    let mut rng = SplitMix(opts.seed);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut cursor = 0;
    // This epoch's sequences: `train`, with a share of the labelled ones varied under --augment.
    let mut epoch: Vec<Sequence> = Vec::new();
    let mut final_loss = f64::NAN;
    let mut last_good: Option<Vec<Tensor>> = None;
    let vars = model.all_vars();
    // Under --ema the moving average of the weights, which validation scores and --out keeps:
    // averaging the last few hundred steps smooths out where the last batches happened to pull.
    let mut average: Option<Vec<Tensor>> = match opts.ema {
        Some(_) => Some(
            vars.iter()
                .map(snapshot)
                .collect::<candle_core::Result<_>>()?,
        ),
        None => None,
    };
    let mut step_seconds = 0.0;
    for step in 0..total {
        let t0 = Instant::now();
        if cursor == batches.len() {
            epoch = match &augmenter {
                Some(aug) => aug.epoch(&train, &sources, &mut rng),
                None => train.clone(),
            };
            batches = epoch_batches(&epoch, opts.batch_size, &mut rng);
            cursor = 0;
        }
        let refs: Vec<&Sequence> = batches[cursor].iter().map(|&i| &epoch[i]).collect();
        cursor += 1;
        let batch = Batch::new(&refs, opts.isolate_tools, DType::F32, &device)?;
        let (loss, correct) = match &teacher {
            Some((teacher, how)) => {
                let exact = Batch::new(&refs, false, DType::F32, &device)?;
                model.soft_loss(&batch, &teacher.logits(&exact)?, *how)?
            }
            None => model.loss(&batch)?,
        };
        let loss_value = loss.to_scalar::<f32>()?;
        // A non-finite loss, or finite loss with non-finite gradients, ends the run: the step is
        // not applied, and --out keeps the best validated weights or else the last weights that
        // gave a finite loss and finite gradients.
        let mut diverged: Option<(&'static str, f64)> = None;
        let mut grads = None;
        if loss_value.is_finite() {
            let mut g = loss.backward()?;
            let norm = clip_gradients(&mut g, &all_trainable, opts.clip)?;
            if norm.is_finite() {
                grads = Some(g);
            } else {
                diverged = Some(("the gradient norm", norm));
            }
        } else {
            diverged = Some(("the loss", loss_value as f64));
        }
        let Some(grads) = grads else {
            let (what, value) = diverged.expect("no gradients only when diverged");
            // A bad loss: the previous step's weights; bad gradients: this step's.
            let (weights, kept_step) = if what == "the loss" {
                (last_good.as_ref(), step)
            } else {
                (None, step + 1)
            };
            let kept = match &best {
                Some((_, _, at)) => format!(
                    "{} keeps the best validated checkpoint (step {at})",
                    opts.out.display()
                ),
                None if kept_step == 0 => format!(
                    "the checkpoint as loaded already gives it, so {} was not written",
                    opts.out.display()
                ),
                None => {
                    if let Some(snapshot) = weights {
                        for (v, t) in vars.iter().zip(snapshot) {
                            v.set(t)?;
                        }
                    }
                    save(&model, &opts.out)?;
                    format!(
                        "{} holds the last weights that gave a finite loss and gradients (those of step {kept_step})",
                        opts.out.display()
                    )
                }
            };
            return Err(FinetuneError::NonFinite {
                what,
                step: step + 1,
                value,
                kept,
            });
        };
        // The weights that gave a finite loss and gradients, kept until the next step proves its
        // own (only needed while no validated checkpoint is in --out).
        if best.is_none() {
            last_good = Some(
                vars.iter()
                    .map(snapshot)
                    .collect::<candle_core::Result<_>>()?,
            );
        }
        let lr = learning_rate(opts.lr, step, warmup, total);
        opt_decay.set_learning_rate(lr);
        opt_plain.set_learning_rate(lr);
        opt_decay.step(&grads)?;
        opt_plain.step(&grads)?;
        if let (Some(average), Some(decay)) = (&mut average, opts.ema) {
            update_average(average, &vars, decay)?;
        }
        final_loss = loss_value as f64;
        let seconds = t0.elapsed().as_secs_f64();
        step_seconds += seconds;
        progress.step(
            step + 1,
            final_loss,
            correct as f64 / batch.n_targets.max(1) as f64,
            seconds,
        );
        let done = step + 1;
        if val.is_some() && (done % opts.val_every == 0 || done == total) {
            // Under --ema the average is what is scored and kept; the live weights go back after.
            let live = match &average {
                Some(average) => Some(swap_weights(&vars, average)?),
                None => None,
            };
            if let Some(v) = validate(&model, done)? {
                progress.line(&format!(
                    "step {done}: validation loss {:.4}, exact match {:.1}%, agreement {:.1}% ({:.0} s)",
                    v.loss,
                    v.exact_match * 100.0,
                    v.agreement * 100.0,
                    v.seconds
                ));
                let key = (v.exact_match, -v.loss, done);
                let better = best.is_none_or(|(e, l, _)| (v.exact_match, -v.loss) > (e, l));
                if better {
                    save(&model, &opts.out)?;
                    best = Some(key);
                }
                validations.push(v);
            }
            if let Some(live) = live {
                swap_weights(&vars, &live)?;
            }
        }
    }
    let kept_step = match best {
        Some((_, _, at)) => at,
        None => {
            if let Some(average) = &average {
                swap_weights(&vars, average)?;
            }
            save(&model, &opts.out)?;
            total
        }
    };
    Ok(Summary {
        steps: total,
        examples: train.len(),
        final_loss,
        validations,
        kept_step,
        seconds_per_step: step_seconds / total.max(1) as f64,
    })
}
