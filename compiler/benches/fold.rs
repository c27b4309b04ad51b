//! How long `--fold tools` takes at build time on a full-size (26M) random checkpoint with a
//! 3-tool schema, next to what one exact-mode query costs on the same model: the ratio says how
//! many queries' worth of encoder work folding does once.
//!
//! Run: `cargo bench -p needlec --bench fold`

use std::path::PathBuf;
use std::time::Instant;

use needle_runtime::checkpoint::DType;
use needle_runtime::config::Config;
use needle_runtime::decode::{Engine, FoldMode};
use needle_runtime::model::Model;
use needlec::frontend::load_tokenizer;
use needlec::tools::parse_tools;

const TOOLS: &str = r#"[
 {"name":"get_weather","description":"Get current weather for a city.","parameters":{"location":{"type":"string","description":"City name.","required":true},"unit":{"type":"string","description":"celsius or fahrenheit.","required":false}}},
 {"name":"set_timer","description":"Start a countdown timer.","parameters":{"minutes":{"type":"integer","description":"Timer length in minutes.","required":true}}},
 {"name":"send_message","description":"Send a text message to a contact.","parameters":{"recipient":{"type":"string","description":"Name of the contact.","required":true},"message":{"type":"string","description":"The message text.","required":true}}}
]"#;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tokenizer =
        load_tokenizer(&root.join("tests/fixtures/golden/dev4k.model")).expect("tokenizer");
    let config = Config::full();
    let t = Instant::now();
    let ckpt = needlec::synth::synth_checkpoint(&config, 7, DType::F32);
    let model = Model::from_checkpoint(&ckpt).expect("valid");
    println!(
        "full-size random checkpoint (D={}, {}+{} layers): synthesized in {:.2?}",
        config.d_model,
        config.num_encoder_layers,
        config.num_decoder_layers,
        t.elapsed()
    );
    let tools = parse_tools(TOOLS).expect("tools").context();

    let t = Instant::now();
    let folded = Engine::new(
        model.clone(),
        tokenizer.clone(),
        tools.clone(),
        FoldMode::Tools,
    )
    .expect("engine");
    let fold_time = t.elapsed();
    println!(
        "fold 3 tools ({} tool tokens): {:.1} ms",
        folded.tool_ids().len(),
        fold_time.as_secs_f64() * 1e3
    );

    let exact = Engine::new(model, tokenizer, tools, FoldMode::None).expect("engine");
    let query = "What's the weather in San Francisco tomorrow morning?";
    let t = Instant::now();
    let prompt = exact.prompt(query);
    let _ = exact.encode_prompt(&prompt);
    let exact_encode = t.elapsed();
    let t = Instant::now();
    let prompt = folded.prompt(query);
    let _ = folded.encode_prompt(&prompt);
    let folded_encode = t.elapsed();
    println!(
        "encode one query ({} tokens): exact {:.1} ms, folded {:.1} ms ({:.1}x faster); folding costs {:.1} exact encodes",
        prompt.n_query_tokens,
        exact_encode.as_secs_f64() * 1e3,
        folded_encode.as_secs_f64() * 1e3,
        exact_encode.as_secs_f64() / folded_encode.as_secs_f64(),
        fold_time.as_secs_f64() / exact_encode.as_secs_f64(),
    );
}
