"""An oracle for the official JAX forward passes, in numpy over the Flax layouts.

Checked against the JAX fixtures in tests/test_big_vision.py, then used for trees of
other sizes. Also builds random trees in the published layout.
"""
import numpy as np


def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def _sub(tree, prefix):
    return {k[len(prefix):]: v for k, v in tree.items() if k.startswith(prefix)}


def _softmax(a):
    a = a - a.max(-1, keepdims=True)
    e = np.exp(a)
    return e / e.sum(-1, keepdims=True)


def crate_forward(tree, images_nhwc):
    k = tree["embedding/kernel"]
    p = k.shape[0]
    n, h, w, _ = images_nhwc.shape
    patches = images_nhwc.reshape(n, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = np.einsum("nijabc,abcd->nijd", patches, k)
    if "embedding/bias" in tree:
        x = x + tree["embedding/bias"]
    x = x.reshape(n, -1, x.shape[-1])
    x = np.concatenate([np.repeat(tree["cls"], n, 0), x], 1) + tree["pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in tree:
        b = _sub(tree, f"Transformer/encoderblock_{i}/")
        y = _ln(x, _sub(b, "LayerNorm_0/"))
        u = np.einsum("bnd,dhk->bhnk", y, b["MultiHeadDotProductSubspaceAttention_0/proj/kernel"])
        a = _softmax(np.einsum("bhnk,bhmk->bhnm", u, u) / np.sqrt(u.shape[-1]))
        x = x + np.einsum("bhnm,bhmk,hkd->bnd", a, u, b["MultiHeadDotProductSubspaceAttention_0/out/kernel"])
        y = _ln(x, _sub(b, "LayerNorm_1/"))
        D, D1 = b["OvercompleteISTABlock_0/D"], b["OvercompleteISTABlock_0/D1"]
        z1 = np.maximum(0.1 * y @ D - 0.01, 0)
        z2 = np.maximum(z1 - 0.1 * (z1 @ D.T - y) @ D - 0.01, 0)
        x = x + z2 @ D1.T
        i += 1
    pre = _ln(x, _sub(tree, "encoder_norm/"))[:, 0]
    out = pre @ tree["head/kernel"]
    return out + tree.get("head/bias", 0), pre


def text_forward(tree, tokens):
    x = tree["Embed_0/embedding"][tokens] + tree["pos_embedding"]
    i = 0
    while f"Transformer/encoderblock_{i}/LayerNorm_0/scale" in tree:
        b = _sub(tree, f"Transformer/encoderblock_{i}/")
        y = _ln(x, _sub(b, "LayerNorm_0/"))
        m = _sub(b, "MultiHeadDotProductAttention_0/")
        q, k, v = (np.einsum("bnd,dhk->bhnk", y, m[f"{n}/kernel"]) + m[f"{n}/bias"][:, None]
                   for n in ("query", "key", "value"))
        a = _softmax(np.einsum("bhnk,bhmk->bhnm", q, k) / np.sqrt(q.shape[-1]))
        x = x + np.einsum("bhnm,bhmk,hkd->bnd", a, v, m["out/kernel"]) + m["out/bias"]
        y = _ln(x, _sub(b, "LayerNorm_1/"))
        hdn = y @ b["MlpBlock_0/Dense_0/kernel"] + b["MlpBlock_0/Dense_0/bias"]
        hdn = 0.5 * hdn * (1 + np.tanh(np.sqrt(2 / np.pi) * (hdn + 0.044715 * hdn ** 3)))
        x = x + hdn @ b["MlpBlock_0/Dense_1/kernel"] + b["MlpBlock_0/Dense_1/bias"]
        i += 1
    return _ln(x, _sub(tree, "encoder_norm/"))[:, -1] @ tree["head/kernel"]


def random_crate_tree(rng, width, depth, heads, patch, res, n_out, bias=True, prefix=""):
    hd = width // heads
    r = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    t = {"cls": r(1, 1, width, scale=0.5), "pos_embedding": r(1, (res // patch) ** 2 + 1, width, scale=0.5),
         "embedding/kernel": r(patch, patch, 3, width, scale=(3 * patch * patch) ** -0.5),
         "encoder_norm/scale": 1 + r(width, scale=0.2), "encoder_norm/bias": r(width, scale=0.1),
         "head/kernel": r(width, n_out, scale=width ** -0.5)}
    if bias:
        t["embedding/bias"] = r(width, scale=0.1)
        t["head/bias"] = r(n_out, scale=0.1)
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for j in (0, 1):
            t[f"{b}LayerNorm_{j}/scale"] = 1 + r(width, scale=0.2)
            t[f"{b}LayerNorm_{j}/bias"] = r(width, scale=0.1)
        t[f"{b}MultiHeadDotProductSubspaceAttention_0/proj/kernel"] = r(width, heads, hd, scale=width ** -0.5)
        t[f"{b}MultiHeadDotProductSubspaceAttention_0/out/kernel"] = r(heads, hd, width, scale=width ** -0.5)
        t[f"{b}OvercompleteISTABlock_0/D"] = r(width, 4 * width, scale=width ** -0.5)
        t[f"{b}OvercompleteISTABlock_0/D1"] = r(width, 4 * width, scale=(4 * width) ** -0.5)
    return {prefix + k: v for k, v in t.items()}


def random_text_tree(rng, width, depth, heads, vocab, context, embed, mlp=None, prefix="txt/"):
    hd, mlp = width // heads, mlp or 4 * width
    r = lambda *s, scale=1.0: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    t = {"Embed_0/embedding": r(vocab, width), "pos_embedding": r(1, context, width, scale=0.5),
         "encoder_norm/scale": 1 + r(width, scale=0.2), "encoder_norm/bias": r(width, scale=0.1),
         "head/kernel": r(width, embed, scale=width ** -0.5)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        for j in (0, 1):
            t[f"{b}LayerNorm_{j}/scale"] = 1 + r(width, scale=0.2)
            t[f"{b}LayerNorm_{j}/bias"] = r(width, scale=0.1)
        for n in ("query", "key", "value"):
            t[f"{b}MultiHeadDotProductAttention_0/{n}/kernel"] = r(width, heads, hd, scale=width ** -0.5)
            t[f"{b}MultiHeadDotProductAttention_0/{n}/bias"] = r(heads, hd, scale=0.1)
        t[f"{b}MultiHeadDotProductAttention_0/out/kernel"] = r(heads, hd, width, scale=width ** -0.5)
        t[f"{b}MultiHeadDotProductAttention_0/out/bias"] = r(width, scale=0.1)
        t[f"{b}MlpBlock_0/Dense_0/kernel"] = r(width, mlp, scale=width ** -0.5)
        t[f"{b}MlpBlock_0/Dense_0/bias"] = r(mlp, scale=0.1)
        t[f"{b}MlpBlock_0/Dense_1/kernel"] = r(mlp, width, scale=mlp ** -0.5)
        t[f"{b}MlpBlock_0/Dense_1/bias"] = r(width, scale=0.1)
    return {prefix + k: v for k, v in t.items()}
