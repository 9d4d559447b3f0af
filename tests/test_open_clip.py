"""CRATE-α CLIP models through open_clip."""
import open_clip
import pytest
import torch

import crate_alpha

NAMES = crate_alpha.list_open_clip_models()


def test_list_models_has_all():
    expected = {f"crate-alpha-{n}" for n in ("B-32", "B-16", "B-8", "L-32", "L-14", "L-8", "H-14",
                                             "CLIPA-L-14", "CLIPA-H-14")}
    assert expected <= set(open_clip.list_models())
    assert expected <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_open_clip_model_runs(name):
    cfg = open_clip.get_model_config(name)
    vision = cfg["vision_cfg"]
    patch = (crate_alpha.variant_args(vision["timm_model_name"])["patch_size"] if "timm_model_name" in vision
             else vision["patch_size"])
    size = vision["image_size"] if "demo" in name else 2 * patch
    model = open_clip.create_model(name, force_image_size=size).eval()
    ctx = cfg["text_cfg"]["context_length"]
    with torch.no_grad():
        img = model.encode_image(torch.randn(1, 3, size, size))
        txt = model.encode_text(torch.randint(0, 100, (1, ctx)))
    assert img.shape == txt.shape == (1, cfg["embed_dim"])


def test_clipa_text_tower_as_released():
    model = open_clip.create_model("crate-alpha-CLIPA-L-14", force_image_size=28)
    assert model.attn_mask is None and model.text_pool_type == "last"
    blk = model.transformer.resblocks[0]
    assert blk.mlp.gelu.approximate == "tanh" and blk.ln_1.eps == 1e-6
    assert model.token_embedding.weight.shape == (32000, 1024) and model.positional_embedding.shape[0] == 32
    assert model.visual.head.proj.bias is None


def test_force_image_size_84():
    model = open_clip.create_model("crate-alpha-L-14", force_image_size=84)
    assert model.visual.trunk.pos_embed.shape == (1, 37, 1024)
    assert model.visual.image_size == (84, 84)
    assert model.encode_image(torch.randn(1, 3, 84, 84)).shape == (1, 768)


def test_84px_checkpoint_loads_into_224_and_back(tmp_path):
    small = open_clip.create_model("crate-alpha-demo", force_image_size=32)
    big = open_clip.create_model("crate-alpha-demo")  # 64 px
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.pt")
    open_clip.load_checkpoint(big, str(tmp_path / "small.pt"))
    assert big.visual.trunk.pos_embed.shape == (1, 65, 128)
    assert torch.equal(big.visual.trunk.pos_embed[0, 0], small.visual.trunk.pos_embed[0, 0])
    small.load_state_dict(big.state_dict())
    assert small.visual.trunk.pos_embed.shape == (1, 17, 128)
