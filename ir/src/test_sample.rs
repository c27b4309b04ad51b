//! A small hand-written module in canonical text, for the unit tests: every op, both entry
//! points, a KV cache, a dead constant (`@head`) and a shared weight (`@emb`).
//! The encoder's norm feeds only matmuls with weights used once, so `fuse-norm-matmul` fires.

pub const SAMPLE: &str = "\
needle_ir v1
dim q in 0..=8
dim p in 0..=3
dim a in 0..=16

const @emb : f32[16,8] weight plain
const @norm : f32[8] weight plain
const @gate : f32[] weight plain
const @wq : f32[8,8] weight plain
const @wk : f32[8,4] weight plain
const @wv : f32[8,4] weight plain
const @qn : f32[4] weight plain
const @dq : f32[8,8] weight plain
const @dk : f32[8,4] weight plain
const @final : f32[8] weight plain
const @head : f32[8,2] weight i8g4
const @rope : f32[11,4] rope_table plain
const @tools : i32[3] tool_tokens plain
const @tools.k : f32[3,1,4] folded_kv plain

buffer $cross : f32[11,1,4]
buffer $cache : f32[4,1,4]

func @encode_query(%query: i32[q]) {
  %ids = concat %query, @tools : i32[q+3]
  %x = embed @emb, %ids, scale=2.828427 : f32[q+3,8]
  %n = zcrmsnorm %x, @norm : f32[q+3,8]
  %q = matmul %n, @wq : f32[q+3,8]
  %qh = reshape %q : f32[q+3,2,4]
  %k = matmul %n, @wk : f32[q+3,4]
  %kh = reshape %k : f32[q+3,1,4]
  %v = matmul %n, @wv : f32[q+3,4]
  %vh = reshape %v : f32[q+3,1,4]
  %qr = rope %qh, @rope, start=8-q : f32[q+3,2,4]
  %a = attention %qr, (%kh, %vh), (@tools.k, @tools.k) : f32[q+3,2,4]
  %cat = reshape %a : f32[q+3,8]
  %x2 = gated_residual %x, %cat, @gate : f32[q+3,8]
  store %vh -> $cross[0..]
  return
}

func @decoder_step(%token: i32[1], %allowed: i32[a]) {
  %x = embed @emb, %token, scale=2.828427 : f32[1,8]
  %qh0 = reshape %x : f32[1,2,4]
  %n = rmsnorm %qh0, @qn : f32[1,2,4]
  %qr = rope %n, @rope, start=p : f32[1,2,4]
  %k = matmul %x, @dk : f32[1,4]
  %kh = reshape %k : f32[1,1,4]
  store %kh -> $cache[p..]
  %a = attention %qr, ($cache[..p+1], $cache[..p+1]), ($cross[..q+3], $cross[..q+3]) : f32[1,2,4]
  %cat = reshape %a : f32[1,8]
  %o = matmul %cat, @dq : f32[1,8]
  %y = residual %x, %o, @gate : f32[1,8]
  %f = zcrmsnorm %y, @final : f32[1,8]
  %logits = logits %f, @emb : f32[1,16]
  %next = argmax_masked %logits, %allowed : i32[1]
  return %next
}
";
