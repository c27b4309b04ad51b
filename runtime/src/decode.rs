//! From query text to tool-call text: prompt assembly (spec section 3), greedy decoding under the
//! reference grammar (spec section 5), and the teacher-forced view used by `needlec trace`.

use std::sync::OnceLock;

use crate::confidence::{chosen_tool, cosine, Confidence, Signals};
use crate::forward::{
    contrastive_embedding, decoder_step, encode, CrossKv, DecoderCache, EncoderMask, FoldedTools,
};
use crate::grammar::{Grammar, GrammarState, GrammarTables};
use crate::model::Model;
use crate::output::postprocess;
use crate::strict::{Strict, StrictError, StrictTables};
use crate::tokenizer::{PieceKind, Tokenizer};

/// Token ids with fixed meanings in every Needle tokenizer.
pub const EOS_ID: u32 = 1;
pub const TOOL_CALL_ID: u32 = 4;
pub const TOOLS_ID: u32 = 5;
/// The encoder's whole input budget in tokens.
pub const ENCODER_BUDGET: usize = 1024;
/// The reference keeps at most this many query tokens.
pub const MAX_QUERY_TOKENS: usize = 1022;
/// The reference's default `max_gen_len`: at most `max_gen_len - 1` generated tokens.
pub const DEFAULT_MAX_GEN_LEN: usize = 512;
/// The most decoder steps (positions `0..MAX_DECODE_STEPS`) a compiled library plans its KV
/// cache for: the reference's default `max_gen_len - 1`, so a build's `max_gen_len` is at most
/// `MAX_DECODE_STEPS + 1`. The runtime itself has no such bound.
pub const MAX_DECODE_STEPS: usize = DEFAULT_MAX_GEN_LEN - 1;
/// The largest `max_gen_len` anything accepts (`run`, `trace`, `eval`, `build`): the
/// reference's default. A model that never emits EOS then stops after 511 tokens instead of
/// running for minutes at a cost quadratic in the length.
pub const MAX_GEN_LEN: usize = MAX_DECODE_STEPS + 1;

/// How the tools side of the encoder is computed (spec section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FoldMode {
    /// The reference: the whole prompt is encoded with full attention for every query.
    None,
    /// Tools-side positions attend only to each other, so they are computed once.
    Tools,
}

impl FoldMode {
    pub fn name(self) -> &'static str {
        match self {
            FoldMode::None => "none",
            FoldMode::Tools => "tools",
        }
    }
}

/// Which grammar constrains decoding (`--grammar`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GrammarKind {
    /// The reference's: tool names and argument keys along tries (spec section 5).
    #[default]
    Reference,
    /// A valid call list under the tool schemas, closed within the budget (`crate::strict`).
    Strict,
}

impl GrammarKind {
    pub fn name(self) -> &'static str {
        match self {
            GrammarKind::Reference => "reference",
            GrammarKind::Strict => "strict",
        }
    }
}

impl std::str::FromStr for GrammarKind {
    type Err = String;

    fn from_str(s: &str) -> Result<GrammarKind, String> {
        match s {
            "reference" => Ok(GrammarKind::Reference),
            "strict" => Ok(GrammarKind::Strict),
            other => Err(format!(
                "unknown grammar {other:?}; the grammars are reference and strict"
            )),
        }
    }
}

/// The normalized tool list as the decoder needs it.
#[derive(Clone, Debug, Default)]
pub struct ToolContext {
    /// Python-exact compact JSON of the normalized list: what the encoder reads.
    pub normalized_json: String,
    /// `(snake_case name, original name)` for every tool.
    pub name_map: Vec<(String, String)>,
    /// `(snake_case name, parameter keys)`: what the grammar constrains.
    pub signatures: Vec<(String, Vec<String>)>,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(
        "the tokenizer has {tokenizer} pieces but the model's vocabulary is {model}: they do not \
         belong together (pass the tokenizer the checkpoint was trained with)"
    )]
    VocabMismatch { tokenizer: usize, model: usize },
    #[error(
        "the tool list takes {}{tool_tokens} tokens, which leaves no room for a query in the \
         {ENCODER_BUDGET}-token encoder budget (the `<tools>` marker takes one more); shorten \
         descriptions or drop tools",
        if *.at_least { "at least " } else { "" }
    )]
    ToolsTooLong {
        tool_tokens: usize,
        /// Counted from the text's length without tokenizing it all ([`tool_ids`]).
        at_least: bool,
    },
    #[error(
        "--max-gen-len must be between 2 and {MAX_GEN_LEN} (it allows max_gen_len - 1 generated \
         tokens), got {0}"
    )]
    MaxGenLen(usize),
    #[error(
        "the model's logits are not finite at decoder step {step} (the chosen token {token} has \
         logit {logit}): the weights are finite but overflow float32 at run time, so there is no \
         answer to give; the checkpoint is corrupt or its training diverged: use an earlier one"
    )]
    NonFiniteLogits { step: usize, token: u32, logit: f32 },
    #[error("answer token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error(
        "--max-query-tokens must be at least 1 (a bound of 0 would drop every query), got 0; \
         leave it out to keep as many as the model allows"
    )]
    MaxQueryTokensZero,
    #[error(
        "--max-query-tokens {requested} is above this model's limit of {limit} query tokens \
         with this tool list (the reference keeps at most {MAX_QUERY_TOKENS}, and the \
         {tool_tokens} tool tokens plus `<tools>` leave {room} of the {ENCODER_BUDGET}-token \
         encoder budget); use at most {limit}, or leave it out for the limit"
    )]
    MaxQueryTokensTooLarge {
        requested: usize,
        limit: usize,
        tool_tokens: usize,
        room: usize,
    },
    #[error(
        "the query is {tokens} tokens, more than the {max} that --max-query-tokens allows; with \
         --fold none the reference would keep it and cut the tool list instead, which a library \
         built with this bound cannot do, so it refuses rather than answer differently (and so \
         does this): shorten the query or raise --max-query-tokens"
    )]
    QueryTooLong { tokens: usize, max: usize },
    #[error("--grammar strict: {0}")]
    Strict(#[from] StrictError),
    #[error(
        "--grammar strict needs at least {needed} generated tokens for the shortest complete \
         answer (`<tool_call>` and `[]`), but max_gen_len {max_gen_len} allows {allows}; raise \
         --max-gen-len to at least {}",
        .needed + 1
    )]
    StrictBudget {
        max_gen_len: usize,
        allows: usize,
        needed: usize,
    },
}

/// The most query tokens a prompt can hold with a tool list of `n_tool_tokens` tokens: the
/// reference's [`MAX_QUERY_TOKENS`], or less when the tools leave less of the encoder budget.
/// `--max-query-tokens` may not exceed it.
pub fn query_token_limit(n_tool_tokens: usize) -> usize {
    MAX_QUERY_TOKENS.min(ENCODER_BUDGET.saturating_sub(1 + n_tool_tokens))
}

/// Checks a `--max-query-tokens` request against the model's limit for this tool list
/// ([`query_token_limit`]); `needlec run`, `trace` and `build` share it so that they agree.
pub fn check_max_query_tokens(
    requested: usize,
    n_tool_tokens: usize,
) -> Result<usize, EngineError> {
    let limit = query_token_limit(n_tool_tokens);
    if requested == 0 {
        return Err(EngineError::MaxQueryTokensZero);
    }
    if requested > limit {
        return Err(EngineError::MaxQueryTokensTooLarge {
            requested,
            limit,
            tool_tokens: n_tool_tokens,
            room: ENCODER_BUDGET.saturating_sub(1 + n_tool_tokens),
        });
    }
    Ok(requested)
}

/// Whether a query longer than `max_query_tokens` is refused rather than cut. In exact mode the
/// reference keeps up to [`MAX_QUERY_TOKENS`] query tokens and cuts the tools to fit; below that
/// bound, cutting the query would answer differently, so it is refused. Folded mode cannot cut
/// its precomputed tools and always cuts the query.
pub fn refuses_long_queries(fold: FoldMode, max_query_tokens: usize) -> bool {
    fold == FoldMode::None && max_query_tokens < MAX_QUERY_TOKENS
}

/// The encoder input for one query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Query tokens, then `<tools>`, then tool tokens.
    pub enc_ids: Vec<u32>,
    pub n_query_tokens: usize,
}

/// What happened at one decoder position.
#[derive(Clone, Debug)]
pub struct Step {
    /// The five largest logits before any grammar mask, best first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
    /// Whether the grammar constrained this step.
    pub grammar_active: bool,
    /// How many tokens the grammar allowed (`None`: unconstrained).
    pub allowed: Option<usize>,
    /// The token chosen (greedy) or fed (teacher-forced) next.
    pub next: u32,
    /// The grammar's span before this step: inside a tool name, an argument key, or neither.
    pub span: GrammarState,
    /// `next`'s probability under the grammar mask: the softmax over the allowed tokens' logits
    /// (over every logit when unconstrained). 1 when the grammar allowed only that token.
    pub prob: f32,
    /// `prob` minus the largest probability of any other allowed token (negative when a
    /// teacher-forced token was not the model's choice; 1 when nothing else was allowed).
    pub margin: f32,
}

/// A whole run for one query.
#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt: Prompt,
    /// Decoder inputs: `[EOS] + generated` (greedy) or `[EOS, <tool_call>] + answer` (forced).
    pub dec_ids: Vec<u32>,
    /// Generated ids, the stopping EOS excluded.
    pub gen_ids: Vec<u32>,
    /// The detokenized generated ids.
    pub text: String,
    /// What the user gets: `<tool_call>` dropped, tool names restored.
    pub output: String,
    pub steps: Vec<Step>,
}

/// A loaded model, tokenizer and tool list, ready to answer queries.
pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub tools: ToolContext,
    pub fold: FoldMode,
    tool_ids: Vec<u32>,
    grammar: GrammarTables,
    /// The strict grammar's tables when `--grammar strict` ([`Engine::with_grammar`]).
    strict: Option<StrictTables>,
    folded: Option<FoldedTools>,
    /// `--max-query-tokens`, checked against [`query_token_limit`]; `None`: the reference's cut.
    query_bound: Option<usize>,
    /// Each tool's contrastive embedding, computed on first use ([`Engine::tool_vectors`]).
    tool_vectors: OnceLock<Vec<Vec<f32>>>,
}

impl Engine {
    /// Tokenizes the tool list and, in folded mode, precomputes the tools side.
    pub fn new(
        model: Model,
        tokenizer: Tokenizer,
        tools: ToolContext,
        fold: FoldMode,
    ) -> Result<Engine, EngineError> {
        if tokenizer.vocab_size() > model.config.vocab_size {
            return Err(EngineError::VocabMismatch {
                tokenizer: tokenizer.vocab_size(),
                model: model.config.vocab_size,
            });
        }
        let tool_ids = tool_ids(&tokenizer, &tools.normalized_json)?;
        let grammar = GrammarTables::new(&tokenizer.token_texts(), &tools.signatures);
        let folded = (fold == FoldMode::Tools)
            .then(|| FoldedTools::precompute(&model, &tools_side(&tool_ids)));
        Ok(Engine {
            model,
            tokenizer,
            tools,
            fold,
            tool_ids,
            grammar,
            strict: None,
            folded,
            query_bound: None,
            tool_vectors: OnceLock::new(),
        })
    }

    /// Bounds the query to `max_query_tokens` tokens (`--max-query-tokens`), exactly as a library
    /// built with the same bound: a longer query is cut in folded mode and refused in exact mode
    /// ([`refuses_long_queries`]).
    pub fn with_max_query_tokens(mut self, max_query_tokens: usize) -> Result<Engine, EngineError> {
        self.query_bound = Some(check_max_query_tokens(
            max_query_tokens,
            self.tool_ids.len(),
        )?);
        Ok(self)
    }

    /// Decodes under `kind` from now on; `strict` compiles its tables from the tool list (an
    /// [`EngineError::Strict`] names a tool and key whose schema it cannot express).
    pub fn with_grammar(mut self, kind: GrammarKind) -> Result<Engine, EngineError> {
        self.strict = match kind {
            GrammarKind::Reference => None,
            GrammarKind::Strict => Some(strict_tables(&self.tokenizer, &self.tools)?),
        };
        Ok(self)
    }

    /// The grammar this engine decodes under.
    pub fn grammar_kind(&self) -> GrammarKind {
        match self.strict {
            Some(_) => GrammarKind::Strict,
            None => GrammarKind::Reference,
        }
    }

    /// The strict grammar's tables, when decoding under it.
    pub fn strict_tables(&self) -> Option<&StrictTables> {
        self.strict.as_ref()
    }

    /// Gives the model and tokenizer back, to build an engine for another tool list without
    /// loading them again (`needlec eval` runs one engine per distinct list).
    pub fn into_parts(self) -> (Model, Tokenizer) {
        (self.model, self.tokenizer)
    }

    /// Token ids of the normalized tool list (before any cut).
    pub fn tool_ids(&self) -> &[u32] {
        &self.tool_ids
    }

    /// The most query tokens this engine keeps: the `--max-query-tokens` bound when set. Without
    /// one, exact mode keeps the reference's 1022 and cuts the tools to fit; folded mode cannot
    /// cut its precomputed tools, so it cuts the query.
    pub fn max_query_tokens(&self) -> usize {
        match (self.query_bound, self.fold) {
            (Some(bound), _) => bound,
            (None, FoldMode::None) => MAX_QUERY_TOKENS,
            (None, FoldMode::Tools) => query_token_limit(self.tool_ids.len()),
        }
    }

    /// The encoder input for a query (spec section 3), the query cut to
    /// [`Engine::max_query_tokens`]; [`Engine::generate`] and [`Engine::forced`] refuse first
    /// where [`refuses_long_queries`] says so ([`Engine::checked_prompt`]).
    pub fn prompt(&self, query: &str) -> Prompt {
        self.prompt_of(self.tokenizer.encode(query))
    }

    /// [`Engine::prompt`], or [`EngineError::QueryTooLong`] where a library built with the same
    /// bound refuses the query.
    pub fn checked_prompt(&self, query: &str) -> Result<Prompt, EngineError> {
        let ids = self.tokenizer.encode(query);
        let max = self.max_query_tokens();
        if ids.len() > max && refuses_long_queries(self.fold, max) {
            return Err(EngineError::QueryTooLong {
                tokens: ids.len(),
                max,
            });
        }
        Ok(self.prompt_of(ids))
    }

    fn prompt_of(&self, mut enc_ids: Vec<u32>) -> Prompt {
        enc_ids.truncate(self.max_query_tokens());
        let n_query_tokens = enc_ids.len();
        enc_ids.push(TOOLS_ID);
        let room = ENCODER_BUDGET - enc_ids.len();
        enc_ids.extend(self.tool_ids.iter().take(room));
        Prompt {
            enc_ids,
            n_query_tokens,
        }
    }

    /// Runs the encoder and returns the cross-attention K/V of every decoder layer.
    pub fn encode_prompt(&self, prompt: &Prompt) -> CrossKv {
        match &self.folded {
            Some(folded) => {
                folded.encode_query(&self.model, &prompt.enc_ids[..prompt.n_query_tokens])
            }
            None => CrossKv::from_encoder(
                &self.model,
                &encode(&self.model, &prompt.enc_ids, EncoderMask::Full),
            ),
        }
    }

    /// Each tool's contrastive embedding, in tool order: the tool's compact normalized JSON (as
    /// it appears in the prompt) encoded alone with full attention, at most
    /// [`ENCODER_BUDGET`] tokens, through the contrastive head. Depends only on the tool list,
    /// so a library holds these as constants.
    pub fn tool_vectors(&self) -> &[Vec<f32>] {
        self.tool_vectors.get_or_init(|| {
            let texts = match crate::pyjson::parse(&self.tools.normalized_json) {
                Ok(crate::pyjson::Value::Array(tools)) => {
                    tools.iter().map(crate::pyjson::to_compact_string).collect()
                }
                _ => Vec::new(),
            };
            texts
                .iter()
                .map(|text: &String| {
                    let mut ids = self.tokenizer.encode(text);
                    ids.truncate(ENCODER_BUDGET);
                    self.embed_alone(&ids)
                })
                .collect()
        })
    }

    /// The contrastive embedding of token ids encoded on their own (full attention).
    fn embed_alone(&self, ids: &[u32]) -> Vec<f32> {
        let states = if ids.is_empty() {
            ndarray::Array2::zeros((0, self.model.config.d_model))
        } else {
            encode(&self.model, ids, EncoderMask::Full)
        };
        contrastive_embedding(&self.model, &states)
    }

    /// The contrastive similarity of the query against every tool: cosines of the query's
    /// embedding (its kept tokens encoded alone) with [`Engine::tool_vectors`].
    pub fn tool_cosines(&self, prompt: &Prompt) -> Vec<f32> {
        let query = self.embed_alone(&prompt.enc_ids[..prompt.n_query_tokens]);
        self.tool_vectors()
            .iter()
            .map(|tool| cosine(&query, tool))
            .collect()
    }

    /// The confidence of a greedy generation (`crate::confidence`): its decode steps, its first
    /// call's tool and the contrastive similarities.
    pub fn confidence(&self, generation: &Generation) -> Confidence {
        let tool = chosen_tool(&generation.text, &self.tools.name_map);
        let cosines = self.tool_cosines(&generation.prompt);
        let signals = Signals::new(
            &generation.steps,
            tool,
            &cosines,
            self.model.contrastive.log_temp,
        );
        Confidence {
            value: signals.confidence(),
            tool,
            signals,
        }
    }

    /// Greedy decoding under the reference grammar, at most `max_gen_len - 1` tokens.
    /// A step with a choice (not exactly one allowed token) whose chosen token's logit is not
    /// finite ends it with [`EngineError::NonFiniteLogits`], as a library's `NAME_ERR_NUMERIC`.
    pub fn generate(&self, query: &str, max_gen_len: usize) -> Result<Generation, EngineError> {
        check_max_gen_len(max_gen_len)?;
        if let Some(strict) = &self.strict {
            check_strict_budget(strict, max_gen_len)?;
        }
        let prompt = self.checked_prompt(query)?;
        self.decode(
            prompt,
            max_gen_len - 1,
            true,
            |_, logits, allowed| match allowed {
                Some(ids) => argmax_among(logits, ids),
                None => argmax(logits),
            },
        )
    }

    /// Teacher-forced run over `[EOS, <tool_call>] + answer_ids`: the logits at every decoder
    /// position and what the grammar would have allowed there.
    pub fn forced(&self, query: &str, answer_ids: &[u32]) -> Result<Generation, EngineError> {
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = answer_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::TokenOutOfRange { id, vocab });
        }
        let prompt = self.checked_prompt(query)?;
        let mut forced = vec![TOOL_CALL_ID];
        forced.extend_from_slice(answer_ids);
        // Teacher forcing shows the logits whatever they are (`needlec trace --answer`).
        self.decode(prompt, forced.len() + 1, false, |i, _, _| {
            forced.get(i).copied().unwrap_or(EOS_ID)
        })
    }

    /// The decode loop both views share: from `[EOS]` over the encoded `prompt`, at most
    /// `max_steps` decoder steps, each recording the logits and the grammar's view, then taking
    /// `choose(step, logits, allowed)` as the next token; EOS ends it. `greedy` (free-running
    /// decoding, not teacher forcing): under the strict grammar the list closes within
    /// `max_steps`, and a chosen logit that is not finite (where the step had a choice) is an
    /// error. The reference machine is fed either way: its span is what the confidence reads.
    fn decode(
        &self,
        prompt: Prompt,
        max_steps: usize,
        greedy: bool,
        mut choose: impl FnMut(usize, &[f32], Option<&[u32]>) -> u32,
    ) -> Result<Generation, EngineError> {
        let cross = self.encode_prompt(&prompt);
        let mut cache = DecoderCache::new(&self.model);
        let mut grammar = Grammar::new(&self.grammar);
        let mut strict = self.strict.as_ref().map(Strict::new);
        let mut dec_ids = vec![EOS_ID];
        let mut steps = Vec::new();
        for i in 0..max_steps {
            let token = *dec_ids.last().expect("starts with EOS");
            let logits = decoder_step(&self.model, &cross, &mut cache, token);
            let strict_allowed = strict
                .as_ref()
                .and_then(|m| m.allowed(greedy.then(|| max_steps - i - 1)));
            let allowed = match (&strict, &strict_allowed) {
                (Some(_), Some(ids)) => Some(ids.as_slice()),
                (Some(_), None) => None,
                (None, _) if grammar.is_active() => grammar.allowed(),
                (None, _) => None,
            };
            let next = choose(i, &logits, allowed);
            let logit = logits[next as usize];
            if greedy && allowed.is_none_or(|a| a.len() != 1) && !logit.is_finite() {
                return Err(EngineError::NonFiniteLogits {
                    step: i,
                    token: next,
                    logit,
                });
            }
            let (prob, margin) = masked_prob_and_margin(&logits, allowed, next);
            steps.push(Step {
                top: top_k(&logits, 5),
                grammar_active: allowed.is_some(),
                allowed: allowed.map(<[u32]>::len),
                next,
                span: grammar.state(),
                prob,
                margin,
            });
            if next == EOS_ID {
                break;
            }
            grammar.feed_token(next);
            if let Some(m) = &mut strict {
                m.feed_token(next);
            }
            dec_ids.push(next);
        }
        let gen_ids = dec_ids[1..].to_vec();
        let text = self.tokenizer.decode(&gen_ids);
        let output = postprocess(&text, &self.tools.name_map);
        Ok(Generation {
            prompt,
            dec_ids,
            gen_ids,
            text,
            output,
            steps,
        })
    }
}

/// The strict grammar's tables for `tools` over `tokenizer`'s vocabulary: what
/// [`Engine::with_grammar`] decodes under and what `needlec build --grammar strict` emits. A
/// [`StrictError`] names a tool and key whose schema the grammar cannot express.
pub fn strict_tables(
    tokenizer: &Tokenizer,
    tools: &ToolContext,
) -> Result<StrictTables, StrictError> {
    let originals: Vec<String> = tools.name_map.iter().map(|(_, o)| o.clone()).collect();
    let schemas = crate::strict::schemas(&tools.normalized_json, &originals)?;
    let texts = tokenizer.token_texts();
    let usable: Vec<bool> = (0..texts.len() as u32)
        .map(|id| {
            matches!(
                tokenizer.kind(id),
                Some(PieceKind::Normal | PieceKind::Byte)
            ) && id != TOOL_CALL_ID
                && id != TOOLS_ID
        })
        .collect();
    Ok(StrictTables::new(
        &texts,
        &usable,
        &schemas,
        TOOL_CALL_ID,
        EOS_ID,
    ))
}

/// Refuses a `max_gen_len` too small for `<tool_call>` plus the shortest complete list under
/// `tables`; greedy decoding and `needlec build --grammar strict` share it.
pub fn check_strict_budget(tables: &StrictTables, max_gen_len: usize) -> Result<(), EngineError> {
    let needed = tables.min_tokens() as usize + 1;
    if needed > max_gen_len.saturating_sub(1) {
        return Err(EngineError::StrictBudget {
            max_gen_len,
            allows: max_gen_len.saturating_sub(1),
            needed,
        });
    }
    Ok(())
}

/// Refuses a `max_gen_len` outside `2..=`[`MAX_GEN_LEN`]; `run`, `trace`, `eval` and `build`
/// share it.
pub fn check_max_gen_len(max_gen_len: usize) -> Result<(), EngineError> {
    if !(2..=MAX_GEN_LEN).contains(&max_gen_len) {
        return Err(EngineError::MaxGenLen(max_gen_len));
    }
    Ok(())
}

/// The tool list's token ids, refused when they leave no room for a query
/// ([`check_tools_fit`]). The budget is checked before tokenizing
/// ([`Tokenizer::encode_at_most`]): a list far too long is refused after reading it once, not
/// after tokenizing it all.
pub fn tool_ids(tokenizer: &Tokenizer, normalized_json: &str) -> Result<Vec<u32>, EngineError> {
    match tokenizer.encode_at_most(normalized_json, ENCODER_BUDGET - 2) {
        Ok(ids) => {
            check_tools_fit(ids.len())?;
            Ok(ids)
        }
        Err(at_least) => Err(EngineError::ToolsTooLong {
            tool_tokens: at_least,
            at_least: true,
        }),
    }
}

/// Refuses a tool list of `tool_tokens` tokens that leaves no room for a query in the
/// [`ENCODER_BUDGET`] (the `<tools>` marker takes one more): the reference would cut the tools
/// to nothing, which no caller wants.
pub fn check_tools_fit(tool_tokens: usize) -> Result<(), EngineError> {
    if tool_tokens + 1 >= ENCODER_BUDGET {
        return Err(EngineError::ToolsTooLong {
            tool_tokens,
            at_least: false,
        });
    }
    Ok(())
}

/// `[<tools>] + tool ids`: the positions that folding precomputes.
pub fn tools_side(tool_ids: &[u32]) -> Vec<u32> {
    let mut ids = Vec::with_capacity(tool_ids.len() + 1);
    ids.push(TOOLS_ID);
    ids.extend_from_slice(tool_ids);
    ids
}

/// Index of the largest logit; the first on ties and the first NaN if any, as `numpy.argmax`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            return i as u32;
        }
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// The allowed id with the largest logit; the lowest id on ties, a NaN counting as largest (as
/// `numpy.argmax` over the masked logits). Nothing allowed means unconstrained.
pub fn argmax_among(logits: &[f32], allowed: &[u32]) -> u32 {
    let mut best: Option<u32> = None;
    for &id in allowed {
        let v = logits[id as usize];
        let better = match best {
            None => true,
            Some(b) => {
                let bv = logits[b as usize];
                !bv.is_nan() && (v.is_nan() || v > bv || (v == bv && id < b))
            }
        };
        if better {
            best = Some(id);
        }
    }
    best.unwrap_or_else(|| argmax(logits))
}

/// The probability of `chosen` under the grammar mask (softmax over the `allowed` logits, or all
/// of them when `None`) and its margin over the most probable other allowed token. A NaN logit
/// gives NaN; a lone allowed token gives `(1, 1)`.
pub fn masked_prob_and_margin(logits: &[f32], allowed: Option<&[u32]>, chosen: u32) -> (f32, f32) {
    match allowed {
        Some(ids) if !ids.is_empty() => prob_and_margin(logits, ids.iter().copied(), chosen),
        _ => prob_and_margin(logits, 0..logits.len() as u32, chosen),
    }
}

fn prob_and_margin(
    logits: &[f32],
    ids: impl Iterator<Item = u32> + Clone,
    chosen: u32,
) -> (f32, f32) {
    let Some(&chosen_logit) = logits.get(chosen as usize) else {
        return (0.0, -1.0);
    };
    let max = ids
        .clone()
        .map(|id| logits[id as usize])
        .fold(chosen_logit, f32::max);
    let mut sum = 0.0f64;
    let mut best_other = f32::NEG_INFINITY;
    let mut chosen_in = false;
    for id in ids {
        let v = logits[id as usize];
        sum += f64::from((v - max).exp());
        if id == chosen {
            chosen_in = true;
        } else {
            best_other = best_other.max(v);
        }
    }
    if !chosen_in {
        // A forced token outside the mask: weigh it among the allowed ones.
        sum += f64::from((chosen_logit - max).exp());
    }
    let p = |v: f32| (f64::from((v - max).exp()) / sum) as f32;
    let prob = p(chosen_logit);
    let other = if best_other == f32::NEG_INFINITY {
        0.0
    } else {
        p(best_other)
    };
    (prob, prob - other)
}

/// The `k` largest logits, best first, lower id first on ties.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, cmp);
    }
    idx.truncate(k);
    idx.sort_by(cmp);
    idx.into_iter().map(|i| (i, logits[i as usize])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_probability_renormalizes_over_the_allowed_tokens() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        // Unconstrained: softmax over all four.
        let (p, m) = masked_prob_and_margin(&logits, None, 3);
        let z: f32 = logits.iter().map(|v| v.exp()).sum();
        assert!((p - 3f32.exp() / z).abs() < 1e-6);
        assert!((m - (3f32.exp() - 2f32.exp()) / z).abs() < 1e-6);
        // Two allowed: a two-way softmax, chosen the lower one: negative margin.
        let (p, m) = masked_prob_and_margin(&logits, Some(&[0, 1]), 0);
        let want = 1.0 / (1.0 + 1f32.exp());
        assert!((p - want).abs() < 1e-6 && (m - (want - (1.0 - want))).abs() < 1e-6);
        // A forced choice.
        assert_eq!(masked_prob_and_margin(&logits, Some(&[2]), 2), (1.0, 1.0));
    }

    #[test]
    fn query_limit_is_the_reference_cut_or_the_room_the_tools_leave() {
        assert_eq!(query_token_limit(0), MAX_QUERY_TOKENS);
        assert_eq!(query_token_limit(1), MAX_QUERY_TOKENS);
        assert_eq!(query_token_limit(100), 1024 - 1 - 100);
    }

    #[test]
    fn max_query_tokens_is_checked() {
        assert!(matches!(
            check_max_query_tokens(0, 100),
            Err(EngineError::MaxQueryTokensZero)
        ));
        assert_eq!(check_max_query_tokens(1, 100).unwrap(), 1);
        assert_eq!(check_max_query_tokens(923, 100).unwrap(), 923);
        let err = check_max_query_tokens(924, 100).unwrap_err();
        assert!(matches!(
            err,
            EngineError::MaxQueryTokensTooLarge {
                requested: 924,
                limit: 923,
                tool_tokens: 100,
                room: 923
            }
        ));
        assert!(err.to_string().contains("use at most 923"), "{err}");
    }

    #[test]
    fn only_exact_mode_below_the_reference_cut_refuses() {
        assert!(refuses_long_queries(FoldMode::None, 128));
        assert!(!refuses_long_queries(FoldMode::None, MAX_QUERY_TOKENS));
        assert!(!refuses_long_queries(FoldMode::Tools, 128));
    }
}
