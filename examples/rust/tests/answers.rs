//! The safe wrapper over the library build.rs compiled: the reference's own answers on the
//! bundled samples, the statuses as `Error`s, and `Send` but not `Sync`.

use needle_example::{Error, Needle, MAX_QUERY_BYTES, TOOL_NAMES, VOCAB_SIZE};

/// `(query, the original implementation's answer)` for the folded checkpoint, folded: what this
/// crate's build (default weights, lossless) must reproduce byte for byte.
fn samples() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tiny-needle/samples.json");
    let text = std::fs::read_to_string(path).expect("the bundled samples");
    let samples: serde_json::Value = serde_json::from_str(&text).expect("samples.json is JSON");
    samples
        .as_array()
        .expect("a list of samples")
        .iter()
        .map(|s| {
            (
                s["query"].as_str().expect("query").to_string(),
                s["fold_folded"].as_str().expect("fold_folded").to_string(),
            )
        })
        .collect()
}

#[test]
fn answers_every_bundled_sample_as_the_reference_does() {
    let mut model = Needle::new();
    let samples = samples();
    assert_eq!(samples.len(), 40);
    for (query, reference) in &samples {
        assert_eq!(&model.call(query).expect(query), reference, "{query}");
        let answer = model.call_ex(query).expect(query);
        assert_eq!(&answer.text, reference, "{query}");
        assert!(answer.parsed, "{query}");
        assert!((0.0..=1.0).contains(&answer.confidence), "{query}");
        let first: serde_json::Value = serde_json::from_str(reference).unwrap();
        assert_eq!(answer.tool, first[0]["name"].as_str(), "{query}");
        assert!(TOOL_NAMES.contains(&answer.tool.unwrap()));
    }
}

#[test]
fn statuses_come_back_as_errors() {
    let mut model = Needle::new();
    assert_eq!(model.call_bytes(b"lights \xff off"), Err(Error::Utf8));
    let long = "a".repeat(MAX_QUERY_BYTES + 1);
    assert_eq!(model.call(&long), Err(Error::QueryTooLong));
    assert_eq!(model.call_tokens(&[VOCAB_SIZE as i32]), Err(Error::Token));
    assert_eq!(model.call_tokens(&[-1]), Err(Error::Token));
    let message = Error::QueryTooLong.to_string();
    assert!(
        message.starts_with("needle: the query is longer than"),
        "{message}"
    );
    assert_eq!(Error::QueryTooLong.status(), 4);
    // The workspace is reusable after an error.
    let (query, reference) = &samples()[0];
    assert_eq!(&model.call(query).unwrap(), reference);
}

#[test]
fn token_level_calls_generate_within_the_limit() {
    let mut model = Needle::new();
    let ids = model.call_tokens(&[5, 17, 42]).expect("valid ids");
    assert!(ids.len() < needle_example::MAX_GEN_LEN);
    assert!(ids.iter().all(|&id| (0..VOCAB_SIZE as i32).contains(&id)));
    let info = Needle::model_info();
    assert_eq!(info.vocab_size, VOCAB_SIZE);
    assert_eq!(info.n_tools as usize, TOOL_NAMES.len());
    assert_eq!(info.fold_tools, 1);
}

#[test]
fn one_model_per_thread_answers_concurrently() {
    let samples = samples();
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let mine: Vec<_> = samples.iter().skip(t).step_by(2).cloned().collect();
            // `Needle` is `Send`: it moves into the thread that uses it.
            let mut model = Needle::new();
            std::thread::spawn(move || {
                for (query, reference) in mine {
                    assert_eq!(model.call(&query).unwrap(), reference, "{query}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("no thread failed");
    }
}

/// Compiles only while `Needle` is not `Sync`: with `Sync`, both impls apply and the call
/// below is ambiguous.
#[test]
fn needle_is_send_but_not_sync() {
    fn send<T: Send>() {}
    send::<Needle>();
    trait AmbiguousIfSync<A> {
        fn check() {}
    }
    impl<T: ?Sized> AmbiguousIfSync<()> for T {}
    impl<T: ?Sized + Sync> AmbiguousIfSync<u8> for T {}
    <Needle as AmbiguousIfSync<_>>::check();
}
