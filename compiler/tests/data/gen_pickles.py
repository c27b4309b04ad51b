"""Generates the small checkpoint pickles in this folder with real numpy and pickle.

Because the files come from numpy's own reducers and Python's own pickler, they are an
independent oracle for needlec's pickle reader: `expected.json` holds every tensor's values
(as float32, row-major) computed here by numpy, not by the Rust code under test.

Run from this folder with numpy 2.x and ml_dtypes installed (tested: numpy 2.4.6,
ml_dtypes 0.6.0):  python3 gen_pickles.py
Variants (all of one tiny config, V=16 D=8 H=2 K=1 L=1 M=2 contrastive_dim=4):
  p2_numpy1_f32.pkl     protocol 2, float32, module paths rewritten to numpy 1.x
                        (`numpy.core.multiarray`); log_temp a numpy scalar (via _codecs.encode)
  p3_bigendian_f16.pkl  protocol 3, big-endian float16, some arrays Fortran-ordered
  p4_bf16.pkl           protocol 4, ml_dtypes.bfloat16, log_temp a 0-d array
  p5_f16_fortran.pkl    protocol 5 (_frombuffer, in-band BYTEARRAY8), float16, Fortran and
                        big-endian arrays, log_temp a numpy scalar
"""
import json
import pickle

import ml_dtypes
import numpy as np

V, D, H, K, L, M, C = 16, 8, 2, 1, 1, 2, 4
h = D // H
config = dict(vocab_size=V, d_model=D, num_heads=H, num_kv_heads=K, num_encoder_layers=L,
              num_decoder_layers=M, contrastive_dim=C, rope_theta=10000, no_feedforward=True)

ENC = "encoder/layers/EncoderBlock_0"
DEC = "decoder/layers/DecoderBlock_0"


def shapes():
    out = [("embedding/embedding", (V, D))]

    def attn(p, n):
        out.extend([(f"{p}/q_proj/kernel", (n, D, D)), (f"{p}/k_proj/kernel", (n, D, K * h)),
                    (f"{p}/v_proj/kernel", (n, D, K * h)), (f"{p}/out_proj/kernel", (n, D, D)),
                    (f"{p}/q_norm/scale", (n, h)), (f"{p}/k_norm/scale", (n, h))])
    out += [(f"{ENC}/ZCRMSNorm_0/scale", (L, D)), (f"{ENC}/attn_gate", (L,))]
    attn(f"{ENC}/self_attn", L)
    out += [("encoder/final_norm/scale", (D,)), (f"{DEC}/ZCRMSNorm_0/scale", (M, D)),
            (f"{DEC}/ZCRMSNorm_1/scale", (M, D)), (f"{DEC}/self_attn_gate", (M,)),
            (f"{DEC}/cross_attn_gate", (M,))]
    attn(f"{DEC}/self_attn", M)
    attn(f"{DEC}/cross_attn", M)
    out += [("decoder/ZCRMSNorm_0/scale", (D,)), ("contrastive_hidden/kernel", (D, D // 4)),
            ("contrastive_hidden/bias", (D // 4,)), ("contrastive_proj/kernel", (D // 4, C))]
    return out


rng = np.random.default_rng(1234)
base = {p: rng.standard_normal(s).astype(np.float32) * 0.5 for p, s in shapes()}
base_log_temp = np.float32(2.6592600345611572)


def nest(flat):
    root = {}
    for path, arr in flat.items():
        *dirs, leaf = path.split("/")
        node = root
        for d in dirs:
            node = node.setdefault(d, {})
        node[leaf] = arr
    return root


def variant(dtype, byteorder, fortran_every, log_temp_kind):
    flat = {}
    for i, (p, a) in enumerate(base.items()):
        arr = a.astype(dtype)
        if byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder(">"))
        if fortran_every and i % fortran_every == 0 and arr.ndim > 1:
            arr = np.asfortranarray(arr)
            # (1, n) and similar are both C- and F-contiguous; numpy then writes C order.
        flat[p] = arr
    lt = np.asarray(base_log_temp).astype(dtype)
    flat["log_temp"] = lt[()] if log_temp_kind == "scalar" else lt
    return flat


def expected(flat, dtype_name):
    return {p: {"dtype": dtype_name, "shape": list(np.shape(a)),
                "values": [float(x) for x in np.asarray(a).astype(np.float32).ravel(order="C")]}
            for p, a in flat.items()}


files = {}
# numpy 1.x writes `numpy.core.multiarray`; protocol 2 GLOBALs are plain text lines with no
# length prefix or frames, so renaming the module in the bytes yields exactly what numpy 1.x writes.
flat = variant(np.float32, "<", 0, "scalar")
data = pickle.dumps({"params": nest(flat), "config": config, "pretrain_step": 7}, protocol=2)
data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
files["p2_numpy1_f32.pkl"] = (data, expected(flat, "float32"))

flat = variant(np.float16, ">", 2, "array")
files["p3_bigendian_f16.pkl"] = (pickle.dumps({"params": nest(flat), "config": config}, protocol=3),
                                 expected(flat, "float16"))

flat = variant(ml_dtypes.bfloat16, "<", 3, "array")
files["p4_bf16.pkl"] = (pickle.dumps({"params": nest(flat), "config": config}, protocol=4),
                        expected(flat, "bfloat16"))

flat = variant(np.float16, "<", 2, "scalar")
flat["contrastive_proj/kernel"] = np.asfortranarray(
    flat["contrastive_proj/kernel"].astype(np.dtype(">f2")))
files["p5_f16_fortran.pkl"] = (pickle.dumps({"params": nest(flat), "config": config}, protocol=5),
                               expected(flat, "float16"))

for name, (data, _) in files.items():
    with open(name, "wb") as f:
        f.write(data)
with open("expected.json", "w") as f:
    json.dump({"config": config, "files": {n: e for n, (_, e) in files.items()}}, f)
