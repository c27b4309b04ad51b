//! `ask QUERY`: prints the bundled model's tool call for QUERY, with its confidence on stderr.

use std::process::ExitCode;

fn main() -> ExitCode {
    let query: Vec<String> = std::env::args().skip(1).collect();
    if query.is_empty() {
        eprintln!("usage: ask QUERY (e.g. ask \"Turn off the lights in the kitchen\")");
        return ExitCode::from(2);
    }
    let mut model = needle_example::Needle::new();
    match model.call_ex(&query.join(" ")) {
        Ok(answer) => {
            println!("{}", answer.text);
            eprintln!("confidence {:.3}", answer.confidence);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}
