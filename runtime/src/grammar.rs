//! Grammar-constrained decoding (spec section 5).
//!
//! Only tool names and argument keys are constrained. A small character-level machine follows
//! the generated text; while it is inside a tool name or an argument key, the next token must
//! continue that span along a trie of the known names (or of the current tool's keys).
//!
//! Everything the machine needs at run time is flat arrays in [`GrammarTables`], and the machine
//! itself ([`Grammar`]) is a handful of integers plus a 16-character tail of the text, so the
//! compiler can emit it as straight-line code over read-only data:
//! - one trie for the tool names and one per tool for its parameter keys, sharing one node array;
//! - for every trie node, the precomputed sorted list of token ids allowed there, so a step's
//!   allowed set is a slice lookup, not a walk over the vocabulary.

/// "No node / no tool": the span has left the trie, or the name is not a known tool.
pub const NONE: u32 = u32::MAX;

/// The longest text suffix any rule looks at is `"arguments":{` (13 characters).
const TAIL: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarState {
    Free,
    InName,
    InArgKey,
}

/// Tries and per-node allowed token lists, all as flat arrays.
///
/// - Nodes are numbered `0..n_nodes`; node 0 is the root of the tool-name trie and
///   `key_roots[t]` the root of tool `t`'s parameter-key trie.
/// - The children of node `i` are `edge_char[k]` -> `edge_child[k]` for
///   `k in edge_start[i]..edge_start[i+1]`, sorted by character (binary-searchable).
/// - `terminal[i]`: a complete name (or key) ends at node `i`.
/// - `node_tool[i]`: for a terminal node of the name trie, the tool it names; else [`NONE`].
/// - `allowed_ids[allowed_start[i]..allowed_start[i+1]]`: the sorted ids of tokens allowed when
///   the current span has reached node `i` (empty = the step is unconstrained).
/// - `token_text[token_start[id]..token_start[id+1]]`: each token's text, as fed to the machine.
#[derive(Debug, Clone)]
pub struct GrammarTables {
    pub edge_start: Vec<u32>,
    pub edge_char: Vec<u32>,
    pub edge_child: Vec<u32>,
    pub terminal: Vec<bool>,
    pub node_tool: Vec<u32>,
    pub key_roots: Vec<u32>,
    pub allowed_start: Vec<u32>,
    pub allowed_ids: Vec<u32>,
    pub token_start: Vec<u32>,
    pub token_text: String,
}

/// A trie under construction: children kept sorted by character.
struct Builder {
    children: Vec<Vec<(char, u32)>>,
    terminal: Vec<bool>,
    node_tool: Vec<u32>,
}

impl Builder {
    fn new_node(&mut self) -> u32 {
        self.children.push(Vec::new());
        self.terminal.push(false);
        self.node_tool.push(NONE);
        (self.children.len() - 1) as u32
    }

    fn insert(&mut self, root: u32, word: &str) -> u32 {
        let mut node = root;
        for c in word.chars() {
            let kids = &self.children[node as usize];
            node = match kids.binary_search_by(|&(k, _)| k.cmp(&c)) {
                Ok(i) => kids[i].1,
                Err(i) => {
                    let child = self.new_node();
                    self.children[node as usize].insert(i, (c, child));
                    child
                }
            };
        }
        self.terminal[node as usize] = true;
        node
    }
}

impl GrammarTables {
    /// `tools`: each tool's (snake_case) name and its parameter keys in order. When two tools
    /// share a name, the later one's keys are used, as a Python dict built from the list would.
    pub fn new(token_texts: &[String], tools: &[(String, Vec<String>)]) -> GrammarTables {
        let mut b = Builder {
            children: Vec::new(),
            terminal: Vec::new(),
            node_tool: Vec::new(),
        };
        let name_root = b.new_node();
        let mut key_roots = Vec::with_capacity(tools.len());
        for (t, (name, keys)) in tools.iter().enumerate() {
            let end = b.insert(name_root, name);
            b.node_tool[end as usize] = t as u32;
            let root = b.new_node();
            for k in keys {
                b.insert(root, k);
            }
            key_roots.push(root);
        }

        let mut edge_start = Vec::with_capacity(b.children.len() + 1);
        let mut edge_char = Vec::new();
        let mut edge_child = Vec::new();
        edge_start.push(0u32);
        for kids in &b.children {
            for &(c, child) in kids {
                edge_char.push(u32::from(c));
                edge_child.push(child);
            }
            edge_start.push(edge_char.len() as u32);
        }

        let mut token_start = Vec::with_capacity(token_texts.len() + 1);
        let mut token_text = String::new();
        token_start.push(0u32);
        for t in token_texts {
            token_text.push_str(t);
            token_start.push(token_text.len() as u32);
        }

        let mut tables = GrammarTables {
            edge_start,
            edge_char,
            edge_child,
            terminal: b.terminal,
            node_tool: b.node_tool,
            key_roots,
            allowed_start: Vec::new(),
            allowed_ids: Vec::new(),
            token_start,
            token_text,
        };
        let mut allowed_start = Vec::with_capacity(tables.terminal.len() + 1);
        let mut allowed_ids = Vec::new();
        allowed_start.push(0u32);
        for node in 0..tables.terminal.len() as u32 {
            for (id, text) in token_texts.iter().enumerate() {
                if tables.token_walks(node, text) {
                    allowed_ids.push(id as u32);
                }
            }
            allowed_start.push(allowed_ids.len() as u32);
        }
        tables.allowed_start = allowed_start;
        tables.allowed_ids = allowed_ids;
        tables
    }

    pub fn n_nodes(&self) -> usize {
        self.terminal.len()
    }

    /// The child of `node` along `c`, or [`NONE`].
    pub fn child(&self, node: u32, c: char) -> u32 {
        let (Some(&a), Some(&b)) = (
            self.edge_start.get(node as usize),
            self.edge_start.get((node as usize).saturating_add(1)),
        ) else {
            return NONE;
        };
        let (Some(chars), Some(kids)) = (
            self.edge_char.get(a as usize..b as usize),
            self.edge_child.get(a as usize..b as usize),
        ) else {
            return NONE;
        };
        match chars.binary_search(&u32::from(c)) {
            Ok(i) => kids.get(i).copied().unwrap_or(NONE),
            Err(_) => NONE,
        }
    }

    fn is_terminal(&self, node: u32) -> bool {
        self.terminal.get(node as usize).copied().unwrap_or(false)
    }

    /// Whether a token with this text may follow a span at `node`: every character must be a
    /// child, except that a `"` at a complete name ends the check (what follows is free).
    /// Empty texts (control tokens) never qualify: they would not advance the span.
    fn token_walks(&self, mut node: u32, text: &str) -> bool {
        if text.is_empty() {
            return false;
        }
        for c in text.chars() {
            if c == '"' {
                return self.is_terminal(node);
            }
            node = self.child(node, c);
            if node == NONE {
                return false;
            }
        }
        true
    }

    /// Sorted ids allowed at `node`, or `None` when there are none (unconstrained step).
    pub fn allowed_at(&self, node: u32) -> Option<&[u32]> {
        let a = *self.allowed_start.get(node as usize)? as usize;
        let b = *self.allowed_start.get((node as usize).saturating_add(1))? as usize;
        let ids = self.allowed_ids.get(a..b)?;
        (!ids.is_empty()).then_some(ids)
    }

    /// The text fed to the machine for a token (empty for unknown ids).
    pub fn token_text(&self, id: u32) -> &str {
        let i = id as usize;
        match (
            self.token_start.get(i),
            self.token_start.get(i.saturating_add(1)),
        ) {
            (Some(&a), Some(&b)) => self.token_text.get(a as usize..b as usize).unwrap_or(""),
            _ => "",
        }
    }
}

/// The reference's grammar machine, fed the text of each chosen token.
#[derive(Debug, Clone)]
pub struct Grammar<'a> {
    tables: &'a GrammarTables,
    state: GrammarState,
    /// Trie node the current name / key span has reached ([`NONE`] once it left the trie).
    node: u32,
    /// Key-trie root of the tool named last ([`NONE`]: unknown tool).
    key_root: u32,
    depth: u32,
    /// Depth of the current call's `"arguments":{` object, while inside it.
    args_depth: Option<u32>,
    in_string: bool,
    escape: bool,
    /// The last characters of the text (oldest first), enough for every suffix rule.
    tail: [char; TAIL],
    tail_len: usize,
    /// The last character of the text that is not a space, tab, CR or LF.
    last_non_ws: Option<char>,
}

impl<'a> Grammar<'a> {
    pub fn new(tables: &'a GrammarTables) -> Grammar<'a> {
        Grammar {
            tables,
            state: GrammarState::Free,
            node: NONE,
            key_root: NONE,
            depth: 0,
            args_depth: None,
            in_string: false,
            escape: false,
            tail: ['\0'; TAIL],
            tail_len: 0,
            last_non_ws: None,
        }
    }

    pub fn state(&self) -> GrammarState {
        self.state
    }

    pub fn is_active(&self) -> bool {
        self.state != GrammarState::Free
    }

    /// Token ids allowed before the next argmax, sorted; `None` = unconstrained (not in a span,
    /// the span has left the trie, the tool is unknown, or nothing would be allowed).
    pub fn allowed(&self) -> Option<&'a [u32]> {
        if !self.is_active() || self.node == NONE {
            return None;
        }
        self.tables.allowed_at(self.node)
    }

    pub fn feed_token(&mut self, id: u32) {
        let tables = self.tables;
        for c in tables.token_text(id).chars() {
            self.feed_char(c);
        }
    }

    fn ends_with(&self, s: &str) -> bool {
        let tail = &self.tail[..self.tail_len];
        let mut i = tail.len();
        for c in s.chars().rev() {
            if i == 0 || tail[i - 1] != c {
                return false;
            }
            i -= 1;
        }
        true
    }

    fn push_text(&mut self, c: char) {
        if self.tail_len == TAIL {
            self.tail.copy_within(1.., 0);
            self.tail_len -= 1;
        }
        self.tail[self.tail_len] = c;
        self.tail_len += 1;
    }

    pub fn feed_char(&mut self, c: char) {
        // The rule for `"` looks at the previous non-blank character, before this one.
        let prev_non_ws = self.last_non_ws;
        self.push_text(c);
        if !matches!(c, ' ' | '\t' | '\r' | '\n') {
            self.last_non_ws = Some(c);
        }

        match self.state {
            GrammarState::InName | GrammarState::InArgKey => {
                if c == '"' {
                    if self.state == GrammarState::InName {
                        let tool = if self.tables.is_terminal(self.node) {
                            self.tables.node_tool.get(self.node as usize).copied()
                        } else {
                            None
                        };
                        self.key_root = tool
                            .and_then(|t| self.tables.key_roots.get(t as usize).copied())
                            .unwrap_or(NONE);
                    }
                    self.state = GrammarState::Free;
                    self.node = NONE;
                } else if self.node != NONE {
                    self.node = self.tables.child(self.node, c);
                }
                return;
            }
            GrammarState::Free => {}
        }

        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if c == '\\' {
                self.escape = true;
            } else if c == '"' {
                self.in_string = false;
            }
            return;
        }

        match c {
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                if c == '}' && self.args_depth.is_some_and(|d| self.depth < d) {
                    self.args_depth = None;
                }
                return;
            }
            '{' | '[' => self.depth = self.depth.saturating_add(1),
            _ => {}
        }

        if self.args_depth.is_none() && self.ends_with("\"name\":\"") {
            self.state = GrammarState::InName;
            self.node = 0;
        } else if self.ends_with("\"arguments\":{") {
            self.args_depth = Some(self.depth);
        } else if self.args_depth == Some(self.depth)
            && (self.ends_with("{\"") || self.ends_with(",\""))
        {
            self.state = GrammarState::InArgKey;
            self.node = self.key_root;
        } else if c == '"' && prev_non_ws == Some(':') {
            self.in_string = true;
        }
    }
}
