"""An oracle for the official torch_inference forward passes, in their own einsum form.

Used to check conversions at sizes other than the fixtures'. It is itself checked against
the fixtures (tests/test_official_torch.py), so it computes what the official code does.
"""
import torch
import torch.nn.functional as F

# The official operators live in the library, where the benchmark runs them too.
from crate_alpha.models.official import ista as _ista, mssa as _mssa


def classifier_forward(sd, images, heads):
    x = F.conv2d(images, sd["conv1.weight"], sd["conv1.bias"], stride=sd["conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    d = x.shape[-1]
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], 1) + sd["pos_embedding"]
    i = 0
    while f"transformer.layers.{i}.0.fn.qkv.weight" in sd:
        p = f"transformer.layers.{i}"
        h = F.layer_norm(x, (d,), sd[f"{p}.0.norm.weight"], sd[f"{p}.0.norm.bias"], 1e-6)
        x = x + _mssa(h, sd[f"{p}.0.fn.qkv.weight"], sd[f"{p}.0.fn.to_out.0.weight"], heads)
        h = F.layer_norm(x, (d,), sd[f"{p}.1.norm.weight"], sd[f"{p}.1.norm.bias"], 1e-6)
        x = x + _ista(h, sd[f"{p}.1.fn.D"], sd[f"{p}.1.fn.D1"])
        i += 1
    pre = F.layer_norm(x[:, 0], (d,), sd["mlp_head.0.weight"], sd["mlp_head.0.bias"], 1e-5)
    return pre @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"], pre


def clipa_image(sd, images, heads):
    w = sd["visual.conv1.weight"]
    x = F.conv2d(images, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    d = x.shape[-1]
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
    x = x + sd["visual.positional_embedding"]
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"visual.transformer.resblocks.{i}"
        h = F.layer_norm(x, (d,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], 1e-6)
        U = sd[f"{p}.attn.in_proj_weight"][:d]
        x = x + _mssa(h, U, sd[f"{p}.attn.out_proj.weight"], heads)
        h = F.layer_norm(x, (d,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], 1e-6)
        x = x + _ista(h, sd[f"{p}.mlp.c_fc"], sd[f"{p}.mlp.c_proj"])
        i += 1
    x = F.layer_norm(x[:, 0], (d,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"], 1e-6)
    return x @ sd["visual.proj"]


def clipa_text(sd, tokens, heads):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    d = x.shape[-1]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{i}"
        h = F.layer_norm(x, (d,), sd[f"{p}.ln_1.weight"], sd[f"{p}.ln_1.bias"], 1e-6)
        q, k, v = (h @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]).chunk(3, -1)
        b, n, _ = q.shape
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, -1) @ v
        a = a.transpose(1, 2).reshape(b, n, d)
        x = x + a @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
        h = F.layer_norm(x, (d,), sd[f"{p}.ln_2.weight"], sd[f"{p}.ln_2.bias"], 1e-6)
        h = F.gelu(h @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
        i += 1
    x = F.layer_norm(x, (d,), sd["ln_final.weight"], sd["ln_final.bias"], 1e-6)
    return x[:, -1] @ sd["text_projection"].T


def random_classifier_sd(width, depth, patch, res, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    n = (res // patch) ** 2
    sd = {"conv1.weight": r(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
          "conv1.bias": r(width, scale=0.1), "cls_token": r(1, 1, width, scale=0.5),
          "pos_embedding": r(1, n + 1, width, scale=0.5),
          "mlp_head.0.weight": 1 + r(width, scale=0.2), "mlp_head.0.bias": r(width, scale=0.1),
          "mlp_head.1.weight": r(num_classes, width, scale=width ** -0.5),
          "mlp_head.1.bias": r(num_classes, scale=0.1)}
    for i in range(depth):
        p = f"transformer.layers.{i}"
        sd.update({f"{p}.0.norm.weight": 1 + r(width, scale=0.2), f"{p}.0.norm.bias": r(width, scale=0.1),
                   f"{p}.0.fn.qkv.weight": r(width, width, scale=width ** -0.5),
                   f"{p}.0.fn.to_out.0.weight": r(width, width, scale=width ** -0.5),
                   f"{p}.1.norm.weight": 1 + r(width, scale=0.2), f"{p}.1.norm.bias": r(width, scale=0.1),
                   f"{p}.1.fn.D": r(width, 4 * width, scale=width ** -0.5),
                   f"{p}.1.fn.D1": r(width, 4 * width, scale=(4 * width) ** -0.5)})
    return sd


def random_clipa_sd(width, depth, patch, res, embed, text_width, text_layers, vocab, context, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    n = (res // patch) ** 2
    sd = {"visual.conv1.weight": r(width, 3, patch, patch, scale=(3 * patch * patch) ** -0.5),
          "visual.class_embedding": r(width, scale=0.5), "visual.positional_embedding": r(n + 1, width, scale=0.5),
          "visual.ln_post.weight": 1 + r(width, scale=0.2), "visual.ln_post.bias": r(width, scale=0.1),
          "visual.proj": r(width, embed, scale=width ** -0.5),
          "token_embedding.weight": r(vocab, text_width), "positional_embedding": r(context, text_width, scale=0.5),
          "ln_final.weight": 1 + r(text_width, scale=0.2), "ln_final.bias": r(text_width, scale=0.1),
          "text_projection": r(embed, text_width, scale=text_width ** -0.5), "logit_scale": torch.tensor(2.6)}
    for i in range(depth):
        p = f"visual.transformer.resblocks.{i}"
        U = r(width, width, scale=width ** -0.5)
        sd.update({f"{p}.ln_1.weight": 1 + r(width, scale=0.2), f"{p}.ln_1.bias": r(width, scale=0.1),
                   f"{p}.attn.in_proj_weight": torch.cat([U, U, U]),
                   f"{p}.attn.out_proj.weight": r(width, width, scale=width ** -0.5),
                   f"{p}.ln_2.weight": 1 + r(width, scale=0.2), f"{p}.ln_2.bias": r(width, scale=0.1),
                   f"{p}.mlp.c_fc": r(width, 4 * width, scale=width ** -0.5),
                   f"{p}.mlp.c_proj": r(width, 4 * width, scale=(4 * width) ** -0.5)})
    t = text_width
    for i in range(text_layers):
        p = f"transformer.resblocks.{i}"
        sd.update({f"{p}.ln_1.weight": 1 + r(t, scale=0.2), f"{p}.ln_1.bias": r(t, scale=0.1),
                   f"{p}.attn.in_proj_weight": r(3 * t, t, scale=t ** -0.5), f"{p}.attn.in_proj_bias": r(3 * t, scale=0.1),
                   f"{p}.attn.out_proj.weight": r(t, t, scale=t ** -0.5), f"{p}.attn.out_proj.bias": r(t, scale=0.1),
                   f"{p}.ln_2.weight": 1 + r(t, scale=0.2), f"{p}.ln_2.bias": r(t, scale=0.1),
                   f"{p}.mlp.c_fc.weight": r(4 * t, t, scale=t ** -0.5), f"{p}.mlp.c_fc.bias": r(4 * t, scale=0.1),
                   f"{p}.mlp.c_proj.weight": r(t, 4 * t, scale=(4 * t) ** -0.5), f"{p}.mlp.c_proj.bias": r(t, scale=0.1)})
    return sd
