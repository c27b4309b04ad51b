"""An independent numpy implementation of docs/needle3.md, checked against the golden vectors.

Written from the spec, not from the package (it imports neither JAX nor needle), so that it
shows the spec is exact enough to implement from. Run by hand:

    /work/venv-n3/bin/python scripts/needle3/check_spec.py [small|default]

For `default` it also rebuilds the checkpoint with the counter-based generator of README.md.
"""
import json
import math
import os
import sys

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIX = os.path.join(ROOT, "tests", "fixtures", "needle3")


def unit(x):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + 1e-6)


def zc(x, g):
    return (1 + g) * unit(x)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def softmax(x, axis=-1):
    m = np.max(x, axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis, keepdims=True)


def logsumexp(x, axis):
    m = np.max(x, axis, keepdims=True)
    return m + np.log(np.exp(x - m).sum(axis, keepdims=True))


def engram_geometry(cfg):
    orders = cfg["engram_orders"]
    heads = cfg["engram_heads"] or max(1, cfg["d_model"] // (len(orders) * 128))
    return orders, heads, cfg["d_model"] // (len(orders) * heads)


def engram_indices(ids, cfg):
    orders, heads, _ = engram_geometry(cfg)
    stride = cfg["engram_seed_heads"] or heads
    T = len(ids)
    out = np.zeros((T, len(orders) * heads), np.int64)
    for oi, order in enumerate(orders):
        for hh in range(heads):
            seed = (0x9E3779B9 * (oi * stride + hh + 1)) & 0xFFFFFFFF
            for t in range(T):
                acc = seed
                for j in range(order):
                    tok = ids[t - j] if t - j >= 0 else 0
                    acc = ((acc ^ tok) * 0x01000193) & 0xFFFFFFFF
                acc ^= acc >> 15
                out[t, oi * heads + hh] = acc % cfg["engram_slots"]
    return out


def kron(z, a, b):
    A, B = a.shape[0], b.shape[0]
    Z = z.reshape(*z.shape[:-1], A, B)
    return np.einsum("...ij,ik,jl->...kl", Z, a, b).reshape(*z.shape[:-1], A * B)


def forward(P, cfg, ids, perms):
    D, H, K = cfg["d_model"], cfg["num_heads"], cfg["num_kv_heads"]
    dq, dv, L, n = cfg["qk_head_dim"], cfg["v_head_dim"], cfg["num_layers"], cfg["mhc_lanes"]
    T = len(ids)
    ids = np.asarray(ids)
    x0 = P["embedding/embedding"][ids] * np.float32(math.sqrt(D))
    # engram
    orders, heads, S = engram_geometry(cfg)
    idx = engram_indices(ids, cfg)
    E = len(orders) * heads
    dil = max(orders)
    sites = {}
    for s, layer in enumerate(cfg["engram_layers"]):
        tab = P[f"engrams_{s}/embedding"]
        m = np.zeros((T, E * S), np.float32)
        for e in range(E):
            order = orders[e // heads]
            ok = (np.arange(T) - (order - 1) >= 0).astype(np.float32)
            m[:, e * S:(e + 1) * S] = tab[e, idx[:, e]] * ok[:, None]
        ek = m @ P[f"engrams_{s}/key_proj/kernel"]
        w = m @ P[f"engrams_{s}/value_proj/kernel"]
        taps = P[f"engrams_{s}/taps"]
        ev = np.zeros_like(w)
        for j in range(4):
            sh = j * dil
            if sh < T:
                ev[sh:] += taps[j] * w[:T - sh]
        sites[layer] = (ek, ev)
    # masks
    t = np.arange(T)
    causal = t[:, None] >= t[None, :]
    band = causal & ((t[:, None] - t[None, :]) < cfg["sliding_window"]) if cfg["sliding_window"] else causal
    freqs = 1.0 / (cfg["rope_theta"] ** (np.arange(0, dq, 2, dtype=np.float32) / dq))
    ang = np.outer(t.astype(np.float32), freqs)
    cos, sin = np.cos(ang), np.sin(ang)
    Nh = 1 << (D - 1).bit_length()
    p1, p2 = perms

    def g(name, l):
        return P["stack/layers/block/" + name][l]

    def block(u, l):
        if l in sites:
            ek, ev = sites[l]
            alpha = sigmoid(np.sum(unit(u) * unit(ek), -1, keepdims=True) / math.sqrt(D))
            u = u + alpha * ev
        a = zc(u, g("ZCRMSNorm_0/scale", l))
        mask = causal if (l in cfg["global_layers"] or not cfg["sliding_window"]) else band
        q = a @ g("self_attn/q_proj/kernel", l)
        k = a @ g("self_attn/k_proj/kernel", l)
        v = a @ g("self_attn/v_proj/kernel", l)
        c = cfg["qkv_conv_taps"]
        if c:
            def conv(z, taps):
                out = taps[0] * z
                for j in range(1, c):
                    ok = np.array([tt - j >= 0 and mask[tt, tt - j] for tt in range(T)], np.float32)
                    sh = np.zeros_like(z)
                    sh[j:] = z[:T - j]
                    out = out + taps[j] * sh * ok[:, None]
                return out
            q = conv(q, g("self_attn/q_taps", l))
            k = conv(k, g("self_attn/k_taps", l))
            v = conv(v, g("self_attn/v_taps", l))
        q = zc(q.reshape(T, H, dq), g("self_attn/q_norm/scale", l))
        k = zc(k.reshape(T, K, dq), g("self_attn/k_norm/scale", l))
        v = v.reshape(T, K, dv)

        def rope(x):
            h = dq // 2
            x1, x2 = x[..., :h], x[..., h:]
            cc, ss = cos[:, None, :], sin[:, None, :]
            return np.concatenate([x1 * cc - x2 * ss, x2 * cc + x1 * ss], -1)
        q, k = rope(q), rope(k)
        o = np.zeros((T, H, dv), np.float32)
        for h in range(H):
            gk = h // (H // K)
            s = (q[:, h] @ k[:, gk].T) / math.sqrt(dq)
            s = np.where(mask, s, -1e30)
            o[:, h] = softmax(s) @ v[:, gk]
        o = o.reshape(T, H * dv) * sigmoid(a @ g("self_attn/gate_proj/kernel", l))
        o = o @ g("self_attn/out_proj/kernel", l)
        x = u + sigmoid(g("attn_gate", l)) * zc(o, g("post_attn_norm/scale", l))
        m = zc(x, g("pre_hada_norm/scale", l))
        hm = lambda nm: g("hadamard_mlp/" + nm, l)
        cond = 1 + softmax(m @ hm("cond_v")) @ hm("cond_u")
        z = np.zeros((T, Nh), np.float32)
        z[:, :D] = m
        z = kron(hm("d1") * z, hm("w1a"), hm("w1b"))[:, p1]
        pre = hm("d2") * cond * z + hm("b2")
        z = kron(pre * sigmoid(pre), hm("w2a"), hm("w2b"))[:, p2]
        z = kron(hm("d3") * z, hm("w3a"), hm("w3b"))
        return x + (hm("d4") * z)[:, :D]

    X = np.repeat(x0[:, None, :], n, 1)
    cells = [x0]
    for l in range(L):
        z = unit(X.reshape(T, n * D))
        lane = l % n
        pre_off = np.where(np.arange(n) == lane, 4.0, -4.0)
        post_off = np.where(np.arange(n) == lane, 0.0, -4.0)
        st = lambda nm: P["stack/" + nm][l]
        hpre = sigmoid(st("mhc_a_pre") * (z @ st("mhc_phi_pre")) + st("mhc_b_pre") + pre_off)
        u = np.einsum("tn,tnc->tc", hpre, X)
        y = block(u, l) - u
        hpost = 2 * sigmoid(st("mhc_a_post") * (z @ st("mhc_phi_post")) + st("mhc_b_post") + post_off)
        M = st("mhc_a_res") * (z @ st("mhc_phi_res")).reshape(T, n, n) + st("mhc_b_res")
        for _ in range(20):
            M = M - logsumexp(M, -1)
            M = M - logsumexp(M, -2)
        R = np.exp(M)
        X = np.einsum("tij,tjc->tic", R, X) + hpost[..., None] * y[:, None, :]
        cells.append(X.mean(1))
    h = zc(X.mean(1), P["stack/final_norm/scale"])
    V = cfg["out_vocab"] or P["embedding/embedding"].shape[0]
    logits = h @ P["embedding/embedding"][:V].T
    C = np.stack(cells, 1)  # T, L+1, D
    heads = {}
    for key, out_key in (("embedding_head", "embedding"), ("confidence_head", "confidence"),
                         ("router_head", "router")):
        pr, gain = P[f"{key}/probes"], P[f"{key}/gain"]
        qry, rb = P[f"{key}/query"], P[f"{key}/row_bias"]
        s = np.einsum("trd,rpd->rpt", C, pr) / math.sqrt(D)
        Rr = np.einsum("rpt,trd->rpd", softmax(s, -1), C)
        Rr = unit(Rr) * gain[..., None]
        uu = np.einsum("rpd,jd->jrp", Rr, qry) / math.sqrt(D) + rb
        w = softmax(uu.reshape(qry.shape[0], -1), -1)
        pooled = (w @ Rr.reshape(-1, D)).reshape(-1)
        y = pooled @ P[f"{key}/proj/kernel"]
        if f"{key}/proj/bias" in P:
            y = y + P[f"{key}/proj/bias"]
        if out_key == "embedding":
            y = y / np.sqrt(np.sum(y * y) + 1e-12)
        heads[out_key] = y
    return logits, C, heads


def mt_permutation(seed, n):
    """numpy's RandomState(seed).permutation(n), from MT19937 (docs/needle3.md, 2.4)."""
    mt = [0] * 624
    mt[0] = seed & 0xFFFFFFFF
    for i in range(1, 624):
        mt[i] = (1812433253 * (mt[i - 1] ^ (mt[i - 1] >> 30)) + i) & 0xFFFFFFFF
    state = {"i": 624}

    def next32():
        if state["i"] >= 624:
            for k in range(624):
                y = (mt[k] & 0x80000000) | (mt[(k + 1) % 624] & 0x7FFFFFFF)
                mt[k] = mt[(k + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            state["i"] = 0
        y = mt[state["i"]]
        state["i"] += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)

    arr = list(range(n))
    for i in range(n - 1, 0, -1):
        mask = i
        for sh in (1, 2, 4, 8, 16):
            mask |= mask >> sh
        while True:
            j = next32() & mask
            if j <= i:
                break
        arr[i], arr[j] = arr[j], arr[i]
    return arr


def ladder_order(L):
    if L == 1:
        return [0]
    sel, order = [0, L - 1], [0, L - 1]
    while len(order) < L:
        sel.sort()
        gaps = [(r - l, l, r) for l, r in zip(sel, sel[1:]) if r - l > 1]
        gap, left, right = max(gaps, key=lambda x: (x[0], -x[1]))
        sel.append((left + right) // 2)
        order.append((left + right) // 2)
    return order


def ladder(P, cfg, depth):
    L = cfg["num_layers"]
    if depth == L:
        return P, cfg
    keep = sorted(ladder_order(L)[:depth])
    remap = {l: i for i, l in enumerate(keep)}
    out, rows = {}, [0] + [l + 1 for l in keep]
    for k, v in P.items():
        if k.startswith("stack/") and k != "stack/final_norm/scale":
            out[k] = v[keep]
        elif k.split("/")[0].endswith("_head") and k.split("/")[-1] in ("probes", "gain"):
            out[k] = v[rows]
        elif k.split("/")[0].endswith("_head") and k.endswith("row_bias"):
            out[k] = v[:, rows]
        elif k.startswith("engrams_"):
            s = int(k.split("/")[0].split("_")[1])
            layer = cfg["engram_layers"][s]
            if layer in remap:
                ns = sum(l in remap for l in cfg["engram_layers"][:s])
                out[f"engrams_{ns}/" + k.split("/", 1)[1]] = v
        else:
            out[k] = v
    c = dict(cfg)
    c["num_layers"] = depth
    c["global_layers"] = [remap[l] for l in cfg["global_layers"] if l in remap]
    c["engram_layers"] = [remap[l] for l in cfg["engram_layers"] if l in remap]
    return out, c


def walsh(G):
    i = np.arange(G)
    pc = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
    return np.where(pc % 2 == 0, 1.0, -1.0).astype(np.float32) / np.float32(math.sqrt(G))


def read_cact(path):
    """A .cact reader written from docs/needle3.md section 8: header, codebooks, directory,
    dequantized tensors (list in directory order)."""
    import struct
    raw = open(path, "rb").read()
    u = struct.unpack_from("<48I", raw, 0)
    theta = struct.unpack_from("<f", raw, 192)[0]
    names = ["tag", "num_tensors", "codebook_len", "kv_window", "kv_bits", "vocab", "out_vocab",
             "d_model", "num_heads", "num_kv_heads", "num_layers", "qk_head_dim", "v_head_dim",
             "max_seq_len", "hada_n", "mhc_lanes", "sliding_window", "global_mask_lo",
             "global_mask_hi", "qkv_conv_taps", "engram_slots", "engram_sub_dim",
             "num_engram_tables", "engram_conv_taps", "engram_conv_dilation",
             "engram_seed_heads", "num_engram_orders"]
    hdr = dict(zip(names, u[:27]))
    hdr["engram_orders"] = list(u[27:31])[:hdr["num_engram_orders"]]
    hdr["num_engram_sites"] = u[31]
    hdr["engram_sites"] = list(u[32:48])[:u[31]]
    hdr["rope_theta"] = theta
    assert hdr["tag"] == 0x05E12A84
    off = 196
    cb = np.frombuffer(raw, "<f4", hdr["codebook_len"], off)
    books = {2: cb[:4], 3: cb[4:12], 4: cb[12:28]}
    off += 4 * hdr["codebook_len"]
    tensors = []
    for i in range(hdr["num_tensors"]):
        dt, nd, _, s0, s1, s2, s3, o, nb, grp, bits = struct.unpack_from("<BBHIIIIQQII", raw, off + 44 * i)
        shape = (s0, s1, s2, s3)[:nd]
        assert o % 64 == 0
        blob = raw[o:o + nb]
        if dt == 1:
            tensors.append(np.frombuffer(blob, "<f2").astype(np.float32).reshape(shape))
        elif dt == 2:
            tensors.append(np.frombuffer(blob, "<f4").reshape(shape))
        elif dt == 4:
            tensors.append(blob)
        else:
            rows, cols = shape
            pad = -(-cols // grp) * grp
            width = 2 if bits == 5 else bits
            nidx = rows * pad * width // 8
            by = np.frombuffer(blob[:nidx], np.uint8).reshape(rows, -1)
            bitstream = np.unpackbits(by, axis=1, bitorder="little")
            idx = np.zeros((rows, pad), np.int64)
            for b in range(width):
                idx |= bitstream[:, b::width].astype(np.int64) << b
            if bits == 5:
                levels = np.array([-1.2240064, 0.0, 1.2240064], np.float32) / np.float32(math.sqrt(grp))
                idx = np.array([1, 2, 0, 0])[idx]  # crumbs 3, 0, 1 -> trits 0, 1, 2
            elif bits == 1:
                c = math.sqrt(2.0 / math.pi)
                levels = np.array([-c, c]) / np.sqrt(grp)
                levels = levels.astype(np.float32)
            else:
                levels = books[bits]
            norms = np.frombuffer(blob[nidx:], "<f2").astype(np.float32).reshape(rows, pad // grp)
            g = levels[idx].reshape(rows, pad // grp, grp) * norms[..., None]
            tensors.append((g @ walsh(grp)).reshape(rows, pad)[:, :cols])
    return hdr, tensors


def cact_to_params(hdr, ts, like):
    """The checkpoint tree back from the positional .cact tensors (section 8's order)."""
    P, it = {}, iter(ts)
    nxt = lambda: next(it)
    L, D, n = hdr["num_layers"], hdr["d_model"], hdr["mhc_lanes"]
    P["embedding/embedding"] = nxt()
    per = {}
    names = ["ZCRMSNorm_0/scale", "self_attn/q_proj/kernel", "self_attn/k_proj/kernel",
             "self_attn/v_proj/kernel"]
    if hdr["qkv_conv_taps"]:
        names += ["self_attn/q_taps", "self_attn/k_taps", "self_attn/v_taps"]
    names += ["self_attn/q_norm/scale", "self_attn/k_norm/scale", "self_attn/gate_proj/kernel",
              "self_attn/out_proj/kernel", "post_attn_norm/scale", "attn_gate",
              "pre_hada_norm/scale"] + ["hadamard_mlp/" + k for k in (
                  "d1", "d2", "b2", "d3", "d4", "w1a", "w1b", "w2a", "w2b", "w3a", "w3b",
                  "cond_v", "cond_u")]
    for l in range(L):
        for nm in names:
            v = nxt()
            if nm.endswith("kernel"):
                v = v.T
            if nm == "attn_gate":
                v = v.reshape(())
            per.setdefault(nm, []).append(v)
    for nm, vs in per.items():
        P["stack/layers/block/" + nm] = np.stack(vs)
    for nm in ("mhc_a_pre", "mhc_a_post", "mhc_a_res", "mhc_b_pre", "mhc_b_post", "mhc_b_res"):
        P["stack/" + nm] = nxt()
    for nm, m in (("mhc_phi_pre", n), ("mhc_phi_post", n), ("mhc_phi_res", n * n)):
        P["stack/" + nm] = nxt().reshape(L, m, n * D).transpose(0, 2, 1)
    perms = (nxt().astype(np.int64), nxt().astype(np.int64))
    E, S, slots = hdr["num_engram_tables"], hdr["engram_sub_dim"], hdr["engram_slots"]
    for s in range(hdr["num_engram_sites"]):
        P[f"engrams_{s}/embedding"] = nxt().reshape(E, slots, S)
        P[f"engrams_{s}/key_proj/kernel"] = nxt().T
        P[f"engrams_{s}/value_proj/kernel"] = nxt().T
        P[f"engrams_{s}/taps"] = nxt()
    P["stack/final_norm/scale"] = nxt()
    rest = list(it)
    if len(rest) > 1:
        codes = rest[0].astype(int).tolist()
        k = 1
        for code in codes:
            key = {1: "embedding_head", 2: "confidence_head", 3: "router_head"}[code]
            probes, gain, query, rb, proj, bias = rest[k:k + 6]
            k += 6
            P[f"{key}/probes"] = probes.reshape(L + 1, -1, D)
            P[f"{key}/gain"], P[f"{key}/query"], P[f"{key}/row_bias"] = gain, query, rb
            P[f"{key}/proj/kernel"] = proj.T
            if code != 1:
                P[f"{key}/proj/bias"] = bias
            if code == 3:
                k += 1  # calibration
    for key, v in like.items():
        if key in P:
            assert P[key].shape == v.shape, (key, P[key].shape, v.shape)
    return P, perms


def check_cact():
    summary = json.load(open(os.path.join(FIX, "small_cact.json")))
    hdr, ts = read_cact(os.path.join(FIX, "small.cact"))
    for rec, t in zip(summary["tensors"], ts):
        if isinstance(t, bytes):
            continue
        a = t.reshape(-1).astype(np.float64)
        assert abs(a.sum() - rec["sum"]) <= 1e-6 * max(1.0, rec["sumsq"]), rec["name"]
        assert np.allclose(a[rec["at"]], rec["values"], rtol=1e-6, atol=1e-7), rec["name"]
    cq = json.load(open(os.path.join(FIX, "cq_codes.json")))
    for case in cq["cases"]:
        # build a one-tensor .cact in memory and read it with read_cact
        import struct, tempfile
        bits, rows, cols, grp = case["bits"], case["out"], case["in"], case["group"]
        blob = bytes.fromhex(case["packed_hex"]) + bytes.fromhex(case["norms_hex"])
        cbv = np.concatenate([np.array(cq["codebooks_group128"][str(b)], np.float32) for b in (2, 3, 4)])
        head = struct.pack("<48If", 0x05E12A84, 1, 28, *([0] * 45), 0.0) + cbv.tobytes()
        off = -(-(len(head) + 44) // 64) * 64
        rec = struct.pack("<BBHIIIIQQII", 3, 2, 0, rows, cols, 0, 0, off, len(blob), grp, bits)
        data = head + rec + b"\0" * (off - len(head) - 44) + blob
        with tempfile.NamedTemporaryFile(suffix=".cact") as f:
            f.write(data)
            f.flush()
            _, (w,) = read_cact(f.name)
        assert np.allclose(w.reshape(-1), case["dequantized"], rtol=1e-5, atol=1e-7), bits
    print("cact: every tensor summary and every CQ code width agree")
    return hdr, ts


def load_safetensors(path):
    from safetensors.numpy import load_file
    return {k: v.astype(np.float32) for k, v in load_file(path).items()}


def spec_value(path, shape, L):
    """The default checkpoint's generator, written from scripts/needle3/README.md ("Weights")."""
    h = 0xCBF29CE484222325
    for byte in path.encode():
        h = ((h ^ byte) * 0x100000001B3) % (1 << 64)
    count = int(np.prod(shape))
    with np.errstate(over="ignore"):
        z = np.uint64(h) + np.arange(1, count + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    v = (z >> np.uint64(40)).astype(np.float64) * 2.0 ** -23 - 1.0
    v = v.reshape(shape)
    leaf = path.split("/")[-1]
    c, w = np.zeros(shape), None
    if path.endswith("out_proj/kernel") or path.endswith("value_proj/kernel"):
        w = math.sqrt(3) * 0.02 / math.sqrt(2 * L)
    elif leaf in ("kernel", "embedding", "cond_v", "probes", "query") or leaf.startswith("mhc_phi"):
        w = math.sqrt(3) * 0.02
    else:
        table = {"scale": (0, 0.1), "attn_gate": (0, 0.5), "b2": (0, 0.1), "d4": (0.02, 0.01),
                 "cond_u": (0, 0.2), "mhc_b_pre": (0, 0.5), "mhc_b_post": (0, 0.5),
                 "row_bias": (0, 0.5), "log_temp": (math.log(10), 0.0)}
        for k in ("d1", "d2", "d3", "gain"):
            table[k] = (1, 0.1)
        for k in ("mhc_a_pre", "mhc_a_post", "mhc_a_res"):
            table[k] = (0.1, 0.05)
        if leaf in table:
            c, w = c + table[leaf][0], table[leaf][1]
        elif leaf in ("q_taps", "k_taps", "v_taps", "taps"):
            c[..., 0, :] = 1.0
            w = 0.2
        elif leaf in ("w1a", "w1b", "w2a", "w2b", "w3a", "w3b"):
            b = shape[-1]
            r = np.arange(b)
            par = np.array([[bin(i & j).count("1") % 2 for j in r] for i in r])
            c = c + np.where(par == 0, 1.0, -1.0) * (1.0 / math.sqrt(b))
            w = 0.05
        elif leaf == "mhc_b_res":
            c = c + 4.0 * np.eye(shape[-1])
            w = 0.5
        elif leaf == "bias":
            c, w = (c, 0.1) if "/proj/" in path else (c - 10.0, 0.0)
    return (c + w * v).astype(np.float32)


LLOYD4 = None


def spec_cq(w, levels, G=128):
    """CQ quantize-dequantize along the last axis (docs/needle3.md section 8), in numpy float32."""
    D = w.shape[-1]
    pad = -D % G
    wp = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,), np.float32)], -1) if pad else w
    g = wp.reshape(-1, G).astype(np.float32)
    Hg = walsh(G)
    rot = g @ Hg
    norm = np.sqrt((rot * rot).sum(-1, keepdims=True))
    unit_ = rot / np.maximum(norm, 1e-12)
    pos = np.clip(np.searchsorted(levels, unit_), 1, len(levels) - 1)
    left, right = levels[pos - 1], levels[pos]
    q = np.where(np.abs(unit_ - left) <= np.abs(unit_ - right), left, right)
    out = (q * norm.astype(np.float16).astype(np.float32)) @ Hg
    return out.reshape(wp.shape)[..., :D]


def cq_weights(P):
    """The cq4 weights of scripts/needle3/README.md ("CQ"), computed from the spec."""
    levels = np.array(json.load(open(os.path.join(FIX, "cq_codes.json")))["codebooks_group128"]["4"],
                      np.float32)
    out = {}
    for k, v in P.items():
        leaf = k.split("/")[-1]
        head = k.split("/")[0].endswith("_head")
        if leaf == "kernel" or leaf.startswith("mhc_phi"):
            out[k] = np.swapaxes(spec_cq(np.swapaxes(v, -1, -2), levels), -1, -2)
        elif (leaf == "embedding" and v.ndim >= 2) or (head and leaf in ("probes", "query")):
            out[k] = spec_cq(v, levels)
        else:
            out[k] = v.astype(np.float16).astype(np.float32)
    return out


def regenerate(cfg_json, golden):
    P = {}
    for path, chk in golden["param_checks"].items():
        P[path] = spec_value(path, tuple(chk["shape"]), cfg_json["num_layers"])
        a = P[path].reshape(-1)
        assert [float(x) for x in a[:4]] == chk["first"] and float(a[-1]) == chk["last"], path
        assert abs(a.astype(np.float64).sum() - chk["sum"]) <= 1e-9 * max(1.0, abs(chk["sum"])), path
    print("default checkpoint regenerated from the README's generator: every param_check agrees")
    return P


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "small"
    G = json.load(open(os.path.join(FIX, f"{name}.json")))
    binf = np.fromfile(os.path.join(FIX, G["bin"]), "<f4")
    cfg = G["config"]
    if name == "small":
        P = load_safetensors(os.path.join(FIX, "small.safetensors"))
    else:
        P = regenerate(cfg, G)
    perms = (np.array(G["hada"]["p1"]), np.array(G["hada"]["p2"]))
    assert mt_permutation(11, G["hada"]["n"]) == G["hada"]["p1"]
    assert mt_permutation(13, G["hada"]["n"]) == G["hada"]["p2"]
    for c in G["cases"]:
        assert (engram_indices(c["ids"], cfg) == np.array(c["engram_indices"])).all()
    weights = {"f32": P}
    if name == "small":
        hdr, ts = check_cact()
        weights["cq4"], cperms = cact_to_params(hdr, ts, P)
        assert all((a == b).all() for a, b in zip(cperms, perms))
    else:
        weights["cq4"] = cq_weights(P)
    worst = 0.0
    for run in G["runs"]:
        if run["weights"] not in weights:
            continue
        Pd, cd = ladder(weights[run["weights"]], cfg, run["depth"])
        ids = G["cases"][run["case"]]["ids"]
        logits, C, heads = forward(Pd, cd, ids, perms)
        o, shp = run["logits"]["offset"] // 4, run["logits"]["shape"]
        want = binf[o:o + int(np.prod(shp))].reshape(shp)
        got = logits[run["logit_rows"]]
        rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
        o, shp = run["hidden"]["offset"] // 4, run["hidden"]["shape"]
        wh = binf[o:o + int(np.prod(shp))].reshape(shp)
        relh = np.max(np.abs(C[run["hidden_rows"]] - wh)) / np.max(np.abs(wh))
        dh = max(np.max(np.abs(heads["embedding"] - run["embedding"])),
                 abs(heads["confidence"][0] - run["confidence"]),
                 np.max(np.abs(heads["router"] - run["router"])))
        am = (logits.argmax(-1) == np.array(run["argmax"])).mean()
        print(f"{run['weights']} case {run['case']} depth {run['depth']}: logits rel {rel:.2e} hidden rel "
              f"{relh:.2e} heads abs {dh:.2e} argmax agree {am:.3f}")
        worst = max(worst, rel, relh)
    print("worst relative difference", worst)


if __name__ == "__main__":
    main()
