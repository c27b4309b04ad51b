"""Golden vectors for Needle 3 from the reference package (cactus-needle 3.2.8).

Run by hand (never by CI), from the repository root, in the venv described in README.md:

    /work/venv-n3/bin/python scripts/needle3/make_golden.py [--only small|default]

Writes tests/fixtures/needle3/: small.safetensors, small.cact, small_cact.json, small.json +
small.bin, default.json + default.bin, cq_codes.json. Every value comes from the package's own
code (architecture.py forward pass and heads, quantize.py CQ, export.py .cact writer/reader,
finetune.py prompt rendering); this script only chooses configs, weights and prompts and
writes the results. See README.md next to this file for the weight generator and formats.
"""
import argparse
import hashlib
import json
import math
import os
import struct

import numpy as np
import jax
import jax.numpy as jnp

from needle.model import architecture as A
from needle.model import export as X
from needle.model import quantize as Q
from needle.model.checkpoints import flatten, unflatten, write_checkpoint, read_checkpoint
from needle.model.finetune import render_example
from needle.model.tokenizer import SANTokenizer, BOS_ID, EOS_ID, TOOLS_END_ID

PACKAGE = "cactus-needle 3.2.8"
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "needle3")

SMALL = dict(vocab_size=2048, d_model=128, num_heads=4, num_kv_heads=2, num_layers=6,
             qk_head_dim=24, v_head_dim=32, max_seq_len=512, engram_heads=2,
             engram_slots=257, engram_layers=(1, 3, 4), global_layers=(2, 5),
             sliding_window=16, embedding_dim=32, dtype="float32")
DEFAULT = dict(vocab_size=8192, dtype="float32")
SMALL_DEPTHS = (6, 3, 4)
DEFAULT_DEPTHS = (20, 8, 14)

# ---------------------------------------------------------------------------------------------
# The counter-based weight generator (README.md, "Weights").

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
GOLDEN = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def fnv1a64(text):
    h = FNV_OFFSET
    for b in text.encode("utf-8"):
        h = ((h ^ b) * FNV_PRIME) & MASK64
    return h


def uniform_pm1(path, n, start=0):
    """v[i] in [-1, 1) for flat indices start..start+n-1 of the parameter at `path` (float64)."""
    h = np.uint64(fnv1a64(path))
    i = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = h + i * np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(40)).astype(np.float64) * (2.0 ** -23) - 1.0


def _walsh_sign(shape):
    b = shape[-1]
    i = np.arange(b)[:, None] & np.arange(b)[None, :]
    pop = np.zeros_like(i)
    for k in range(int(b).bit_length()):
        pop += (i >> k) & 1
    sign = np.where(pop % 2 == 0, 1.0, -1.0) * (1.0 / math.sqrt(b))
    return np.broadcast_to(sign, shape)


def rule(path, shape, num_layers):
    """(kind, center array or scalar, half width) for a parameter path. kind 'normal' leaves
    are the package's normal(std) inits (center 0, half width std*sqrt(3)); 'const' leaves are
    the package's constant inits (center = that constant) plus a documented perturbation."""
    last = path.rsplit("/", 1)[-1]
    s3 = math.sqrt(3.0)
    resid = 0.02 / math.sqrt(2 * num_layers)
    if path.endswith("out_proj/kernel") or path.endswith("value_proj/kernel"):
        return "normal", 0.0, resid * s3
    if (last in ("kernel", "embedding", "cond_v", "probes", "query")
            or last.startswith("mhc_phi")):
        return "normal", 0.0, 0.02 * s3
    if last == "scale":
        return "const", 0.0, 0.1
    if last == "attn_gate":
        return "const", 0.0, 0.5
    if last in ("q_taps", "k_taps", "v_taps", "taps"):
        c = np.zeros(shape)
        c[..., 0, :] = 1.0
        return "const", c, 0.2
    if last in ("d1", "d2", "d3", "gain"):
        return "const", 1.0, 0.1
    if last == "b2":
        return "const", 0.0, 0.1
    if last == "d4":
        return "const", 0.02, 0.01
    if last == "cond_u":
        return "const", 0.0, 0.2
    if last in ("w1a", "w1b", "w2a", "w2b", "w3a", "w3b"):
        return "const", _walsh_sign(shape), 0.05
    if last in ("mhc_b_pre", "mhc_b_post"):
        return "const", 0.0, 0.5
    if last == "mhc_b_res":
        return "const", np.broadcast_to(4.0 * np.eye(shape[-1]), shape), 0.5
    if last in ("mhc_a_pre", "mhc_a_post", "mhc_a_res"):
        return "const", 0.1, 0.05
    if last == "row_bias":
        return "const", 0.0, 0.5
    if last == "bias" and "/proj/" in path:
        return "const", 0.0, 0.1
    if last == "log_temp":
        return "const", math.log(10.0), 0.0
    if last == "bias":
        return "const", -10.0, 0.0
    raise KeyError(f"no generator rule for {path}")


def generate(path, shape, num_layers):
    kind, center, width = rule(path, shape, num_layers)
    n = int(np.prod(shape))
    v = uniform_pm1(path, n).reshape(shape)
    return (np.asarray(center, np.float64) + width * v).astype(np.float32), kind


# ---------------------------------------------------------------------------------------------

def make_config(fields):
    return A.TransformerConfig(**fields)


def full_config_dict(cfg):
    return {f: (list(v) if isinstance(v, tuple) else v)
            for f in cfg.__dataclass_fields__ for v in [getattr(cfg, f)]}


def _everything(module, tokens):
    logits = module(tokens)
    cells, keep, row_keep = module._head_cells(tokens)
    emb = module.embedding_head(cells, keep, row_keep)[0]
    conf = module.confidence_head(cells, keep, row_keep)[..., 0]
    router = module.router_head(cells, keep, row_keep)
    return logits, cells, emb, conf, router


def init_params(cfg, seed, example_len=24):
    model = A.SimpleAttentionNetwork(cfg)
    toks = jnp.arange(2, 2 + example_len, dtype=jnp.int32)[None]
    return jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(seed), toks,
                                               method=_everything)["params"])


def param_shapes(cfg):
    model = A.SimpleAttentionNetwork(cfg)
    toks = jnp.zeros((1, 8), jnp.int32)
    tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), toks,
                                             method=_everything)["params"])
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            name = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, dict) or hasattr(v, "items"):
                walk(v, name)
            else:
                out[name] = tuple(v.shape)
    walk(tree, "")
    return out


def small_params(cfg):
    """Package init (flax, PRNGKey(0)) for the normal-init leaves; the constant-init leaves
    get the generator's perturbation so every path is exercised."""
    flat = flatten(init_params(cfg, 0))
    for path, value in flat.items():
        kind, _, _ = rule(path, value.shape, cfg.num_layers)
        if kind == "const":
            flat[path], _ = generate(path, value.shape, cfg.num_layers)
        else:
            flat[path] = np.asarray(value, np.float32)
    return flat


def default_params(cfg):
    flat = {}
    for path, shape in param_shapes(cfg).items():
        flat[path], _ = generate(path, shape, cfg.num_layers)
    return flat


def param_checks(flat):
    return {p: {"shape": list(v.shape), "first": [float(x) for x in v.reshape(-1)[:4]],
                "last": float(v.reshape(-1)[-1]), "sum": float(v.astype(np.float64).sum())}
            for p, v in sorted(flat.items())}


# ---------------------------------------------------------------------------------------------
# CQ: the package's own weight quantization (quantize.py), as the .cact holds the weights.

def cq_params(flat):
    """Weights as export.py stores them, dequantized: CQ4 (quantize.cq_quantize_params, group
    128) for kernels, embeddings, engram tables and mHC phi; CQ4 (HEAD_BITS) for the heads'
    probes and query; every other tensor rounded to float16."""
    tree = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    tree = Q.cq_quantize_params(tree, Q.WEIGHT_BITS, Q.CQ_GROUP_SIZE)
    qflat = {k: np.asarray(v, np.float32) for k, v in flatten(jax.tree.map(np.asarray, tree)).items()}
    out = {}
    for path, v in qflat.items():
        last = path.rsplit("/", 1)[-1]
        head = path.split("/", 1)[0] in A.HEAD_KEYS
        if head and last in ("probes", "query"):
            out[path] = np.asarray(Q.cq_quantize(jnp.asarray(flat[path]), Q.HEAD_BITS,
                                                 Q.CQ_GROUP_SIZE), np.float32)
        elif (last in ("kernel", "embedding") or last.startswith("mhc_phi")) and v.ndim >= 2:
            out[path] = v
        else:
            out[path] = flat[path].astype(np.float16).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Prompts (finetune.render_example / _encode).

TOOLS_A = [
    {"name": "get_weather", "description": "Get the current weather for a city.",
     "parameters": {"location": {"type": "string", "description": "City name.", "required": True},
                    "units": {"type": "string", "description": "celsius or fahrenheit.",
                              "required": False}}},
    {"name": "set_timer", "description": "Start a countdown timer.",
     "parameters": {"minutes": {"type": "integer", "description": "Length in minutes.",
                                "required": True}}},
]
TOOLS_B = [
    {"name": "send_message", "description": "Send a text message to a contact.",
     "parameters": {"to": {"type": "string", "description": "Contact name.", "required": True},
                    "body": {"type": "string", "description": "Message text.", "required": True}}},
]
TOOLS_C = TOOLS_A + TOOLS_B + [
    {"name": "toggle_lights", "description": "Turn the lights in a room on or off.",
     "parameters": {"room": {"type": "string", "description": "Room name.", "required": True},
                    "state": {"type": "boolean", "description": "On (true) or off (false).",
                              "required": True}}},
]
EXAMPLES = [
    {"system": "You are a helpful on-device assistant.", "tools": TOOLS_A,
     "query": "What's the weather in Paris in celsius?",
     "reasoning": "The user asks for the weather in Paris, units celsius.",
     "answers": [{"name": "get_weather", "arguments": {"location": "Paris", "units": "celsius"}}]},
    {"tools": TOOLS_B, "query": "Text Zoë that I'll be in Zürich at 5 — see you!",
     "answers": [{"name": "send_message",
                  "arguments": {"to": "Zoë", "body": "I'll be in Zürich at 5 — see you!"}}]},
    {"tools": TOOLS_C, "query": "Turn off the kitchen lights and set a timer for 10 minutes",
     "reasoning": "Two actions: lights off in the kitchen, then a 10 minute timer.",
     "answers": [{"name": "toggle_lights", "arguments": {"room": "kitchen", "state": False}},
                 {"name": "set_timer", "arguments": {"minutes": 10}}]},
]


def encode_case(tok, example):
    prompt, target = render_example(example)
    p_ids, t_ids = tok.encode(prompt), tok.encode(target)
    ids = [BOS_ID] + p_ids + t_ids + [EOS_ID]
    return {"example": example, "prompt": prompt, "target": target, "ids": ids,
            "prompt_len": 1 + len(p_ids), "tools_end_pos": ids.index(TOOLS_END_ID)}


# ---------------------------------------------------------------------------------------------

class Bin:
    def __init__(self):
        self.buf = bytearray()

    def put(self, arr):
        arr = np.ascontiguousarray(np.asarray(arr, "<f4"))
        off = len(self.buf)
        self.buf += arr.tobytes()
        return {"offset": off, "shape": list(arr.shape)}


def f32list(a):
    return [float(x) for x in np.asarray(a, np.float32).reshape(-1)]


_JITTED = {}


def run_model(cfg, flat, ids):
    key = json.dumps(full_config_dict(cfg), sort_keys=True, default=str)
    if key not in _JITTED:
        model = A.SimpleAttentionNetwork(cfg)
        _JITTED[key] = jax.jit(lambda p, t: model.apply({"params": p}, t, method=_everything))
    fn = _JITTED[key]
    params = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    logits, cells, emb, conf, router = fn(params, jnp.asarray([ids], jnp.int32))
    return (np.asarray(logits[0], np.float32), np.asarray(cells[0], np.float32),
            np.asarray(emb[0], np.float32), float(np.asarray(conf[0], np.float32)),
            np.asarray(router[0], np.float32))


def slice_depth(flat, cfg, depth):
    if depth == cfg.num_layers:
        return flat, cfg
    tree = unflatten({k: jnp.asarray(v) for k, v in flat.items()})
    sliced = A.ladder_slice(tree, cfg, depth)
    return ({k: np.asarray(v, np.float32) for k, v in flatten(jax.tree.map(np.asarray, sliced)).items()},
            A.ladder_config(cfg, depth))


def golden(name, cfg, flat, qflat, tok_name, depths, cases, full_rows, extra):
    out = {"package": PACKAGE, "generator": "scripts/needle3/make_golden.py",
           "config": full_config_dict(cfg), "tokenizer": tok_name, "bin": f"{name}.bin",
           "cases": [], "runs": []}
    out.update(extra)
    orders, heads, _ = A.engram_geometry(cfg)
    hada_n = 1 << (cfg.d_model - 1).bit_length()
    p1, p2 = A._hada_perms(hada_n, False)
    out["hada"] = {"n": hada_n, "blocks": list(A._hada_blocks(hada_n)),
                   "p1": [int(x) for x in np.asarray(p1)], "p2": [int(x) for x in np.asarray(p2)]}
    for c in cases:
        idx = A.engram_indices(jnp.asarray([c["ids"]], jnp.int32), orders, heads,
                               cfg.engram_slots, cfg.engram_seed_heads)
        out["cases"].append({**c, "engram_indices": np.asarray(idx[0]).tolist()})
    b = Bin()
    variants = (("f32", flat), ("cq4", qflat))
    for depth in depths:
        sliced = {w: slice_depth(f, cfg, depth) for w, f in variants}
        for weights, _ in variants:
            dflat, dcfg = sliced[weights]
            for ci, c in enumerate(cases):
                print(f"  {name} depth {depth} {weights} case {ci}", flush=True)
                logits, cells, emb, conf, router = run_model(dcfg, dflat, c["ids"])
                T = len(c["ids"])
                if (ci, depth) in full_rows:
                    lrows = hrows = list(range(T))
                else:
                    lrows = sorted({0, 1, c["tools_end_pos"], c["prompt_len"] - 1, T - 1})
                    hrows = sorted({c["tools_end_pos"], T - 1})
                run = {"case": ci, "depth": depth,
                       "layers": list(A.ladder_layer_indices(cfg, depth)),
                       "config": full_config_dict(dcfg), "weights": weights,
                       "logit_rows": lrows, "logits": b.put(logits[lrows]),
                       "argmax": [int(x) for x in logits.argmax(-1)],
                       "logits_row_l2": f32list(np.sqrt((logits.astype(np.float64) ** 2).sum(-1))),
                       "hidden_rows": hrows, "hidden": b.put(cells[hrows]),
                       "confidence": float(np.float32(conf)), "router": f32list(router),
                       "embedding": f32list(emb)}
                out["runs"].append(run)
    with open(os.path.join(OUT, f"{name}.bin"), "wb") as f:
        f.write(bytes(b.buf))
    with open(os.path.join(OUT, f"{name}.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False, separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# .cact for the small config (export.py), with its read_export summarized.

def _summary(arr):
    a = np.asarray(arr, np.float32).reshape(-1)
    n = a.size
    at = sorted({0, n // 3, n // 2, n - 1})
    return {"sum": float(a.astype(np.float64).sum()),
            "sumsq": float((a.astype(np.float64) ** 2).sum()),
            "first": f32list(a[:8]), "at": at, "values": f32list(a[at])}


def cact(cfg, flat, qflat, tok):
    """Writes small.cact and small_cact.json; returns qflat with every CQ tensor replaced by
    the .cact's own dequantized values (read_export), so the cq4 vectors are exactly what a
    loader of small.cact computes with."""
    path = os.path.join(OUT, "small.cact")
    params = unflatten({k: np.asarray(v) for k, v in flat.items()})
    kvw = A.effective_kv_window(cfg)
    info = X.write_export(params, cfg, path, bits=Q.WEIGHT_BITS, group=Q.CQ_GROUP_SIZE,
                          tokenizer=tok, kv_window=kvw)
    names = [t.name for t in X._tensors(params, cfg, Q.WEIGHT_BITS, Q.CQ_GROUP_SIZE)]
    names.append("tokenizer")
    meta, tensors = X.read_export(path)
    raw = open(path, "rb").read()
    hdr_size = struct.calcsize(X._HDR_FMT)
    off = hdr_size + meta["codebook"].size * 4
    recs = []
    for i in range(meta["num_tensors"]):
        rec = struct.unpack_from(X._REC_FMT, raw, off + i * X.REC_SIZE)
        t = tensors[i]
        r = {"index": i, "name": names[i], "dtype": rec[0], "ndim": rec[1],
             "shape": list(rec[3:3 + rec[1]]), "offset": rec[7], "nbytes": rec[8],
             "group": rec[9], "bits": rec[10]}
        if isinstance(t, (bytes, bytearray)):
            r["sha256"] = hashlib.sha256(t).hexdigest()
            r["n_pieces"] = X._tokenizer_pieces(t)
        else:
            r.update(_summary(t))
        recs.append(r)
    # Cross-check: the .cact's dequantized weights against this script's cq_params.
    ex = {n: t for n, t in zip(names, tensors)}
    checks = {}
    L = cfg.num_layers
    pairs = [("embedding", qflat["embedding/embedding"])]
    for i in range(L):
        for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "out_proj"):
            pairs.append((f"layer{i:02d}.{proj}",
                          qflat[f"stack/layers/block/self_attn/{proj}/kernel"][i].T))
    for s in range(len(cfg.engram_layers)):
        e = qflat[f"engrams_{s}/embedding"]
        pairs.append((f"engram{s}.tables", e.reshape(-1, e.shape[-1])))
    for nm in ("mhc_phi_pre", "mhc_phi_post", "mhc_phi_res"):
        phi = qflat[f"stack/{nm}"]
        pairs.append((nm, phi.transpose(0, 2, 1).reshape(-1, phi.shape[1])))
    for hk in A.HEAD_KEYS:
        pairs.append((f"{hk}.probes", qflat[f"{hk}/probes"].reshape(-1, cfg.d_model)))
        pairs.append((f"{hk}.proj", qflat[f"{hk}/proj/kernel"].T))
    for n, want in pairs:
        checks[n] = float(np.max(np.abs(ex[n] - want)))
    cq = dict(qflat)
    for i in range(L):
        for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "out_proj"):
            p = f"stack/layers/block/self_attn/{proj}/kernel"
            if cq[p] is qflat[p]:
                cq[p] = np.array(qflat[p])
            cq[p][i] = ex[f"layer{i:02d}.{proj}"].T
    cq["embedding/embedding"] = ex["embedding"]
    for s in range(len(cfg.engram_layers)):
        shp = qflat[f"engrams_{s}/embedding"].shape
        cq[f"engrams_{s}/embedding"] = ex[f"engram{s}.tables"].reshape(shp)
        cq[f"engrams_{s}/key_proj/kernel"] = ex[f"engram{s}.key_proj"].T
        cq[f"engrams_{s}/value_proj/kernel"] = ex[f"engram{s}.value_proj"].T
    for nm in ("mhc_phi_pre", "mhc_phi_post", "mhc_phi_res"):
        Lx, nC, lanes = qflat[f"stack/{nm}"].shape
        cq[f"stack/{nm}"] = ex[nm].reshape(Lx, lanes, nC).transpose(0, 2, 1)
    for hk in A.HEAD_KEYS:
        cq[f"{hk}/probes"] = ex[f"{hk}.probes"].reshape(qflat[f"{hk}/probes"].shape)
        cq[f"{hk}/query"] = ex[f"{hk}.query"]
        cq[f"{hk}/proj/kernel"] = ex[f"{hk}.proj"].T
    for k in cq:
        cq[k] = np.array(cq[k], np.float32, order="C")
        assert cq[k].shape == qflat[k].shape, k
        assert np.max(np.abs(cq[k] - qflat[k])) < 1e-3, k
    summary = {"package": PACKAGE, "file": "small.cact", "bytes": info["bytes"],
               "sha256": hashlib.sha256(raw).hexdigest(), "header_bytes": hdr_size,
               "record_bytes": X.REC_SIZE, "directory_offset": off,
               "header": {k: (list(v) if isinstance(v, tuple) else
                              f32list(v) if isinstance(v, np.ndarray) else v)
                          for k, v in meta.items()},
               "tensors": recs,
               "max_abs_diff_vs_cq_quantize": checks}
    with open(os.path.join(OUT, "small_cact.json"), "w") as f:
        json.dump(summary, f, separators=(",", ":"))
    print("  cact", info)
    return cq


def cq_codes():
    """Every CQ code width built from the layout, dequantized by the package's _cq_unpack."""
    rs = np.random.RandomState(7)
    out, in_dim, group = 3, 200, 128
    in_pad = 256
    cases = []
    for bits in (1, 2, 3, 4, X.TERNARY_RECORD_BITS):
        levels = 3 if bits == X.TERNARY_RECORD_BITS else 1 << bits
        idx = rs.randint(0, levels, size=(out, in_pad)).astype(np.uint8)
        if bits == X.TERNARY_RECORD_BITS:
            crumbs = np.where(idx == 0, 3, idx - 1).astype(np.uint8)  # trit 0,1,2 -> 3,0,1
            packed = X._pack_lsb(crumbs, 2)
        else:
            packed = X._pack_lsb(idx, bits)
        norms = (rs.rand(out, in_pad // group) * 2 + 0.5).astype(np.float16)
        w = X._cq_unpack(packed, norms, out, in_dim, bits, group)
        cases.append({"bits": bits, "out": out, "in": in_dim, "group": group,
                      "indices": idx.tolist(), "packed_hex": packed.tobytes().hex(),
                      "norms_hex": norms.tobytes().hex(), "dequantized": f32list(w)})
    cb = {str(b): f32list(Q._cq_codebook_np(b, group)) for b in (1, 2, 3, 4)}
    cb["ternary"] = f32list(Q._cq_codebook_np(Q.TERNARY_BITS, group))
    with open(os.path.join(OUT, "cq_codes.json"), "w") as f:
        json.dump({"package": PACKAGE, "codebooks_group128": cb, "cases": cases}, f,
                  separators=(",", ":"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("small", "default"))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.only in (None, "small"):
        cfg = make_config(SMALL)
        tok = SANTokenizer(os.path.join(OUT, "n3tok2k.model"))
        flat = small_params(cfg)
        ck = os.path.join(OUT, "small.safetensors")
        write_checkpoint(ck, {"format_version": 2, "config": full_config_dict(cfg),
                              "params": unflatten(flat), "step": 0,
                              "run": {"generator": "scripts/needle3/make_golden.py"}})
        back = flatten(read_checkpoint(ck)["params"])
        assert all(np.array_equal(back[k], flat[k]) for k in flat)
        cases = [encode_case(tok, e) for e in EXAMPLES]
        qflat = cact(cfg, flat, cq_params(flat), tok)
        golden("small", cfg, flat, qflat, "n3tok2k.model", SMALL_DEPTHS, cases,
               {(0, 6)}, {"checkpoint": "small.safetensors", "cq4_weights": "small.cact",
                          "param_count": int(sum(v.size for v in flat.values()))})
        cq_codes()
    if args.only in (None, "default"):
        cfg = make_config(DEFAULT)
        tok = SANTokenizer(os.path.join(OUT, "n3tok8k.model"))
        flat = default_params(cfg)
        count = int(sum(v.size for v in flat.values()))
        print("  default params", count)
        cases = [encode_case(tok, e) for e in EXAMPLES[:2]]
        golden("default", cfg, flat, cq_params(flat), "n3tok8k.model", DEFAULT_DEPTHS, cases,
               set(), {"param_count": count, "param_checks": param_checks(flat),
                       "cq4_weights": "quantize.cq_quantize (JAX), see README"})


if __name__ == "__main__":
    main()
