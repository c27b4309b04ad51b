//! What `needlec finetune` costs on a full-size (26M) checkpoint: seconds per step at batch 16 on
//! this machine's cores and peak memory, for a full fine-tune and for LoRA adapters side by side
//! in one run, and the projected time for the yardstick (500 examples x 3 epochs).
//!
//! The checkpoint is random (the real weights are not available offline); the data is the
//! committed head of the fine-tune set (`tests/fixtures/finetune/train_head.jsonl`) tokenized
//! with the golden 4k tokenizer padded to the full vocabulary, so sequence lengths are those of
//! real tool-calling examples. Validation is off: only training steps are timed.
//!
//! Run: `cargo bench -p needlec --bench finetune` (about 5 minutes on 2 cores;
//! `NEEDLE_BENCH_STEPS=N` changes the timed steps per variant, default 8).

use std::path::{Path, PathBuf};

use needle_runtime::checkpoint::DType;
use needle_runtime::config::Config;
use needlec::finetune::{FinetuneOptions, Progress};
use needlec::frontend::load_tokenizer;

const BATCH: usize = 16;
/// The yardstick: an app's 500 examples for 3 epochs.
const YARDSTICK_EXAMPLES: usize = 500 * 3;

/// Peak resident memory of this process so far, in bytes (`VmHWM`).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Resets `VmHWM` to the current resident size, so each variant's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = std::env::temp_dir().join("needlec-bench-finetune");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let steps: usize = std::env::var("NEEDLE_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);

    let config = Config::full();
    let golden = root.join("tests/fixtures/golden/dev4k.model");
    let have = load_tokenizer(&golden).expect("tokenizer").vocab_size();
    let tokenizer = dir.join("dev4k-padded.model");
    std::fs::write(
        &tokenizer,
        needlec::synth::padded_sentencepiece(
            &std::fs::read(&golden).expect("tokenizer"),
            have,
            config.vocab_size,
        ),
    )
    .expect("write tokenizer");
    let checkpoint = dir.join("full.safetensors");
    {
        let ckpt = needlec::synth::synth_checkpoint(&config, 11, DType::F32);
        needlec::load::save_safetensors(&ckpt, &checkpoint).expect("write checkpoint");
    }
    println!(
        "full-size random checkpoint: D={} H={} K={} {}+{} layers V={}, f32; batch {BATCH}; {steps} timed steps per variant; {} cores",
        config.d_model,
        config.num_heads,
        config.num_kv_heads,
        config.num_encoder_layers,
        config.num_decoder_layers,
        config.vocab_size,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    println!(
        "{:<22} {:>10} {:>12} {:>26}",
        "variant", "s/step", "peak MiB", "500 examples x 3 epochs"
    );
    let data = root.join("tests/fixtures/finetune/train_head.jsonl");
    let mut full_seconds = None;
    for (name, lora) in [("full fine-tune", None), ("LoRA rank 8", Some(8))] {
        let seconds = variant(&dir, &checkpoint, &tokenizer, &data, steps, lora);
        let peak = peak_rss().map_or("-".into(), |b| format!("{:.0}", b as f64 / 1048576.0));
        let yardstick_steps = YARDSTICK_EXAMPLES.div_ceil(BATCH);
        println!(
            "{:<22} {:>10.2} {:>12} {:>20.1} min{}",
            name,
            seconds,
            peak,
            seconds * yardstick_steps as f64 / 60.0,
            match full_seconds {
                Some(full) => format!("  ({:.2}x the full fine-tune's speed)", full / seconds),
                None => String::new(),
            }
        );
        full_seconds.get_or_insert(seconds);
    }
    println!(
        "(the projection is {} steps of {BATCH} at the measured seconds per step; the issue asks for at most 30 min)",
        YARDSTICK_EXAMPLES.div_ceil(BATCH)
    );
}

/// Seconds per step of one variant (the first step, which also allocates, is not counted).
fn variant(
    dir: &Path,
    checkpoint: &Path,
    tokenizer: &Path,
    data: &Path,
    steps: usize,
    lora: Option<usize>,
) -> f64 {
    reset_peak_rss();
    let opts = FinetuneOptions {
        checkpoint: checkpoint.to_path_buf(),
        tokenizer: tokenizer.to_path_buf(),
        data: data.to_path_buf(),
        out: dir.join("out.safetensors"),
        isolate_tools: true,
        lora_rank: lora,
        steps: Some(steps + 1),
        batch_size: BATCH,
        seed: 1,
        ..FinetuneOptions::default()
    };
    let times = std::cell::RefCell::new(Vec::new());
    struct Timed<'a>(&'a std::cell::RefCell<Vec<f64>>);
    impl Progress for Timed<'_> {
        fn step(&self, step: usize, loss: f64, _token_accuracy: f64, seconds: f64) {
            self.0.borrow_mut().push(seconds);
            eprintln!("  step {step}: loss {loss:.3}, {seconds:.1} s");
        }
    }
    needlec::finetune::run(&opts, &Timed(&times)).expect("finetune");
    let times = times.into_inner();
    let timed = &times[1..];
    timed.iter().sum::<f64>() / timed.len().max(1) as f64
}
