//! The generated Needle 3 step against the runtime's forward pass (`needlec run`'s engine),
//! side by side in one run, on the default config (width 768, vocabulary 8192; its documented
//! generator's weights, float32) at the ladder depth suited to phones (8 layers) and at its 20,
//! with a 3-tool prompt folded up to `</tools>` in both.
//!
//! Prints, per depth: the folded prefix's and the query's token counts, query prefill (the
//! multi-row entry, up to 16 positions a call) and decode (one-row steps) tokens/s for each
//! engine and the generated/runtime ratios, the object's bytes and the workspace's; then the
//! whole library (`needlec build`'s, [`generate_needle3`]): one `NAME_call_ex` from the query's
//! text to the answer, at most [`DECODE_LEN`] generated tokens, against the runtime's
//! `Engine::generate` on the same folded prompt, with the archive's and the workspace's bytes.
//! The weights are float32 (the engram tables alone are 283 MB).
//!
//! Run: `cargo bench -p needlec-tests --bench needle3_step` (minutes: it generates two 0.5 GB
//! objects per depth).

use std::path::Path;

use needle_runtime::needle3::cact::CqWeights;
use needle_runtime::needle3::engine::Engine;
use needle_runtime::needle3::forward::Cache;
use needle_runtime::needle3::generate::Generated;
use needle_runtime::needle3::prompt::{encode_prompt, tools_json};
use needle_runtime::needle3::{Config, Model};
use needle_runtime::tokenizer::Tokenizer;
use needle_targets::Target;
use needle_test_support::c::build_harness;
use needle_test_support::{best_of, work_dir};
use needlec::abi::write_header;
use needlec::codegen::needle3::define_needle3_model;
use needlec::codegen::needle3::library::{generate_needle3, Needle3LibraryInput};
use needlec::codegen::KernelSet;
use needlec::emit::{write_archive, ArchiveMember};

const TOOLS: &str = r#"[{"name":"get_weather","description":"Get current weather for a city.","parameters":{"location":{"type":"string","description":"City name.","required":true}}},{"name":"set_timer","description":"Start a countdown timer.","parameters":{"minutes":{"type":"integer","description":"Timer length in minutes.","required":true}}},{"name":"send_message","description":"Send a text message to a contact.","parameters":{"recipient":{"type":"string","description":"Name of the contact.","required":true},"message":{"type":"string","description":"The message text.","required":true}}}]"#;
const QUERY: &str = "What's the weather going to be like in San Francisco tomorrow?";
const DECODE_LEN: usize = 32;
const REPEATS: usize = 3;

fn fixture(name: &str) -> std::path::PathBuf {
    needle_test_support::repo_root()
        .join("tests/fixtures/needle3")
        .join(name)
}

fn main() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("default.json")).unwrap()).unwrap();
    let config = Config::from_json(&json["config"].to_string()).unwrap();
    let layers = config.num_layers;
    let full = Model::load(config.clone(), &mut Generated { num_layers: layers }).unwrap();
    let codes: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("cq_codes.json")).unwrap()).unwrap();
    let levels: Vec<f32> = codes["codebooks_group128"]["4"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let cq_full = Model::load(
        config,
        &mut CqWeights::new(Generated { num_layers: layers }, 128, levels),
    )
    .unwrap();
    let tokenizer =
        Tokenizer::from_model_bytes(&std::fs::read(fixture("n3tok8k.model")).unwrap()).unwrap();
    let tools = tools_json(TOOLS).unwrap();
    let prompt = encode_prompt(&tokenizer, "", &tools, QUERY).unwrap();
    let (prefix, query) = prompt.ids.split_at(prompt.prefix_len);
    println!(
        "Needle 3 default config, {} prefix tokens folded, {} query tokens, {DECODE_LEN} decode steps",
        prefix.len(),
        query.len()
    );
    let host = Target::host().unwrap();
    for depth in [8, layers] {
        let model = full.clone().into_ladder(depth).unwrap();
        let mut cache = Cache::new(&model);
        cache.extend(&model, prefix).unwrap();

        // The runtime: the query's rows from a copy of the folded cache, then one row a step.
        let rt_prefill = best_of(REPEATS, || {
            let mut c = cache.clone();
            c.extend(&model, query).unwrap();
        });
        let mut c = cache.clone();
        c.extend(&model, query).unwrap();
        let rt_decode = best_of(1, || {
            let mut c = c.clone();
            for i in 0..DECODE_LEN {
                c.extend(&model, &[(i % 100) as u32 + 100]).unwrap();
            }
        });

        // The generated step, folded the same way.
        let positions = prompt.ids.len() + DECODE_LEN + 1;
        let mut ks = KernelSet::new(&host, "b3_").unwrap();
        let code = define_needle3_model(&mut ks, &model, positions, Some(prefix), true).unwrap();
        let functions = ks.functions().to_vec();
        let obj = ks.finish().unwrap();
        let object_bytes = obj.len();
        let extra = format!(
            "#define N3_WS_BYTES {}\n#define N3_WS_ALIGN {}\n#define N3_FIRST {}\n\
             #define N3_STEP b3_n3_step\n#define N3_ROWS b3_n3_rows\n#define N3_MAX_ROWS {}\n",
            code.workspace_bytes, code.workspace_align, code.first_position, code.max_rows
        );
        let header = write_header("b3_model", &["needle3 step bench"], &extra, &functions);
        let ar = write_archive(
            host.archive_kind(),
            &[ArchiveMember {
                name: format!("needle3.{}", host.object_extension()),
                data: obj,
            }],
        )
        .unwrap();
        let dir = work_dir(&format!("bench_needle3_{depth}"));
        let exe = build_harness(&dir, "b3model", &ar, &header, "needle3_bench.c");
        let mut input = format!("{}", query.len());
        for id in query {
            input.push_str(&format!(" {id}"));
        }
        input.push_str(&format!(" {DECODE_LEN}\n"));
        let out = needle_test_support::c::run(Path::new(&exe), &[], input.as_bytes());
        let text = String::from_utf8(out.stdout).unwrap();
        let mut it = text.split_whitespace();
        let lib_prefill: f64 = it.next().unwrap().parse().unwrap();
        let lib_decode: f64 = it.next().unwrap().parse().unwrap();

        let q = query.len() as f64;
        let d = DECODE_LEN as f64;
        println!("\n{depth} layers:");
        println!(
            "  runtime:        prefill {:8.1} tok/s, decode {:8.1} tok/s",
            q / rt_prefill,
            d / rt_decode
        );
        println!(
            "  generated step: prefill {:8.1} tok/s, decode {:8.1} tok/s  (x{:.2}, x{:.2} the runtime)",
            q / lib_prefill,
            d / lib_decode,
            rt_prefill / lib_prefill,
            rt_decode / lib_decode
        );
        println!(
            "  object {:.1} MB (float32), workspace {:.1} MB for {positions} positions",
            object_bytes as f64 / 1e6,
            code.workspace_bytes as f64 / 1e6
        );

        // The whole library against the engine: one call each, query text to answer.
        let engine =
            Engine::new(model.clone(), tokenizer.clone(), "", tools.clone(), true).unwrap();
        let rt_call = best_of(1, || {
            engine.generate(QUERY, DECODE_LEN).unwrap();
        });
        let rt_tokens = engine.generate(QUERY, DECODE_LEN).unwrap().new_ids.len();
        let names = needlec::needle3::tool_names(&tools);
        let input = Needle3LibraryInput {
            model: &model,
            tokenizer: &tokenizer,
            prefix_ids: prefix,
            fold: true,
            tool_names: &names,
            name: "b3lib",
            max_gen_len: DECODE_LEN + 1,
            max_query_tokens: 64,
            escalate_below: 0.0,
            strict: None,
        };
        let lib = generate_needle3(&input, &host).unwrap();
        let (lib_call, f32_archive, generated) = time_call(&host, &dir, lib.object, &lib.header);
        println!(
            "  library call:   {:.1} ms for {} query tokens and {} generated (runtime {:.1} ms, {} generated; x{:.2})",
            lib_call * 1e3,
            query.len(),
            generated,
            rt_call * 1e3,
            rt_tokens,
            rt_call / lib_call
        );
        println!(
            "  library archive {:.1} MB, workspace {:.2} MB",
            f32_archive as f64 / 1e6,
            lib.info.layout.total as f64 / 1e6
        );

        // The same library from the CQ4 model (the package's deployment quantization), its
        // weights kept as codes: for the baseline target (one lookup a code) and with SSSE3
        // (16 codes a byte shuffle, as aarch64 always does).
        let cq_model = cq_full.clone().into_ladder(depth).unwrap();
        let cq_engine =
            Engine::new(cq_model.clone(), tokenizer.clone(), "", tools.clone(), true).unwrap();
        let want = cq_engine.generate(QUERY, DECODE_LEN).unwrap();
        for (what, target) in [
            ("baseline", host.clone()),
            (
                "+ssse3",
                Target::with_features(host.name, &["ssse3"]).unwrap(),
            ),
        ] {
            if what == "+ssse3" && !needle_targets::host_cpu_features().contains(&"ssse3") {
                continue;
            }
            let lib = generate_needle3(
                &Needle3LibraryInput {
                    model: &cq_model,
                    ..input
                },
                &target,
            )
            .unwrap();
            let cq_dir = dir.join(what.trim_start_matches('+'));
            std::fs::create_dir_all(&cq_dir).unwrap();
            let (cq_call, cq_archive, cq_generated) =
                time_call(&host, &cq_dir, lib.object, &lib.header);
            println!(
                "  CQ4 library ({what}): {:.1} ms, {} generated (engine on the dequantized \
                 weights: {}; x{:.2} the float32 library), archive {:.1} MB (x{:.2} smaller)",
                cq_call * 1e3,
                cq_generated,
                want.new_ids.len(),
                lib_call / cq_call,
                cq_archive as f64 / 1e6,
                f32_archive as f64 / cq_archive as f64
            );
        }
    }
}

/// One `b3lib_call_ex` of `QUERY` through the library's object archived and linked into the
/// call bench's harness in `dir`: the best time in seconds, the archive's bytes and the
/// generated token count.
fn time_call(host: &Target, dir: &Path, object: Vec<u8>, header: &str) -> (f64, usize, String) {
    let ar = write_archive(
        host.archive_kind(),
        &[ArchiveMember {
            name: format!("b3lib.{}", host.object_extension()),
            data: object,
        }],
    )
    .unwrap();
    let exe = build_harness(dir, "b3lib", &ar, header, "needle3_call_bench.c");
    let out = needle_test_support::c::run(Path::new(&exe), &[], QUERY.as_bytes());
    let text = String::from_utf8(out.stdout).unwrap();
    let f: Vec<&str> = text.split_whitespace().collect();
    assert_eq!(f[2], "0", "the call succeeds");
    (f[0].parse().unwrap(), ar.len(), f[1].to_string())
}
