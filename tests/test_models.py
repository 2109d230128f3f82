"""Visual/textual backbones, heads and the LocTex model (issue 3)."""
import math

import pytest
import torch

import loctex.kernels as K
from loctex.config import load_config
from loctex.models import build_model, build_resnet
from loctex.models.text import masked_mean

from _model_batches import VOCAB, make_batch

# torchvision 0.28's resnet50().state_dict() keys, in order, one module per line (read off torchvision
# itself; torchvision cannot be imported here).
RESNET50_KEYS_BY_MODULE = """
    conv1: weight
    bn1: weight bias running_mean running_var num_batches_tracked
    layer1.0.conv1: weight
    layer1.0.bn1: weight bias running_mean running_var num_batches_tracked
    layer1.0.conv2: weight
    layer1.0.bn2: weight bias running_mean running_var num_batches_tracked
    layer1.0.conv3: weight
    layer1.0.bn3: weight bias running_mean running_var num_batches_tracked
    layer1.0.downsample.0: weight
    layer1.0.downsample.1: weight bias running_mean running_var num_batches_tracked
    layer1.1.conv1: weight
    layer1.1.bn1: weight bias running_mean running_var num_batches_tracked
    layer1.1.conv2: weight
    layer1.1.bn2: weight bias running_mean running_var num_batches_tracked
    layer1.1.conv3: weight
    layer1.1.bn3: weight bias running_mean running_var num_batches_tracked
    layer1.2.conv1: weight
    layer1.2.bn1: weight bias running_mean running_var num_batches_tracked
    layer1.2.conv2: weight
    layer1.2.bn2: weight bias running_mean running_var num_batches_tracked
    layer1.2.conv3: weight
    layer1.2.bn3: weight bias running_mean running_var num_batches_tracked
    layer2.0.conv1: weight
    layer2.0.bn1: weight bias running_mean running_var num_batches_tracked
    layer2.0.conv2: weight
    layer2.0.bn2: weight bias running_mean running_var num_batches_tracked
    layer2.0.conv3: weight
    layer2.0.bn3: weight bias running_mean running_var num_batches_tracked
    layer2.0.downsample.0: weight
    layer2.0.downsample.1: weight bias running_mean running_var num_batches_tracked
    layer2.1.conv1: weight
    layer2.1.bn1: weight bias running_mean running_var num_batches_tracked
    layer2.1.conv2: weight
    layer2.1.bn2: weight bias running_mean running_var num_batches_tracked
    layer2.1.conv3: weight
    layer2.1.bn3: weight bias running_mean running_var num_batches_tracked
    layer2.2.conv1: weight
    layer2.2.bn1: weight bias running_mean running_var num_batches_tracked
    layer2.2.conv2: weight
    layer2.2.bn2: weight bias running_mean running_var num_batches_tracked
    layer2.2.conv3: weight
    layer2.2.bn3: weight bias running_mean running_var num_batches_tracked
    layer2.3.conv1: weight
    layer2.3.bn1: weight bias running_mean running_var num_batches_tracked
    layer2.3.conv2: weight
    layer2.3.bn2: weight bias running_mean running_var num_batches_tracked
    layer2.3.conv3: weight
    layer2.3.bn3: weight bias running_mean running_var num_batches_tracked
    layer3.0.conv1: weight
    layer3.0.bn1: weight bias running_mean running_var num_batches_tracked
    layer3.0.conv2: weight
    layer3.0.bn2: weight bias running_mean running_var num_batches_tracked
    layer3.0.conv3: weight
    layer3.0.bn3: weight bias running_mean running_var num_batches_tracked
    layer3.0.downsample.0: weight
    layer3.0.downsample.1: weight bias running_mean running_var num_batches_tracked
    layer3.1.conv1: weight
    layer3.1.bn1: weight bias running_mean running_var num_batches_tracked
    layer3.1.conv2: weight
    layer3.1.bn2: weight bias running_mean running_var num_batches_tracked
    layer3.1.conv3: weight
    layer3.1.bn3: weight bias running_mean running_var num_batches_tracked
    layer3.2.conv1: weight
    layer3.2.bn1: weight bias running_mean running_var num_batches_tracked
    layer3.2.conv2: weight
    layer3.2.bn2: weight bias running_mean running_var num_batches_tracked
    layer3.2.conv3: weight
    layer3.2.bn3: weight bias running_mean running_var num_batches_tracked
    layer3.3.conv1: weight
    layer3.3.bn1: weight bias running_mean running_var num_batches_tracked
    layer3.3.conv2: weight
    layer3.3.bn2: weight bias running_mean running_var num_batches_tracked
    layer3.3.conv3: weight
    layer3.3.bn3: weight bias running_mean running_var num_batches_tracked
    layer3.4.conv1: weight
    layer3.4.bn1: weight bias running_mean running_var num_batches_tracked
    layer3.4.conv2: weight
    layer3.4.bn2: weight bias running_mean running_var num_batches_tracked
    layer3.4.conv3: weight
    layer3.4.bn3: weight bias running_mean running_var num_batches_tracked
    layer3.5.conv1: weight
    layer3.5.bn1: weight bias running_mean running_var num_batches_tracked
    layer3.5.conv2: weight
    layer3.5.bn2: weight bias running_mean running_var num_batches_tracked
    layer3.5.conv3: weight
    layer3.5.bn3: weight bias running_mean running_var num_batches_tracked
    layer4.0.conv1: weight
    layer4.0.bn1: weight bias running_mean running_var num_batches_tracked
    layer4.0.conv2: weight
    layer4.0.bn2: weight bias running_mean running_var num_batches_tracked
    layer4.0.conv3: weight
    layer4.0.bn3: weight bias running_mean running_var num_batches_tracked
    layer4.0.downsample.0: weight
    layer4.0.downsample.1: weight bias running_mean running_var num_batches_tracked
    layer4.1.conv1: weight
    layer4.1.bn1: weight bias running_mean running_var num_batches_tracked
    layer4.1.conv2: weight
    layer4.1.bn2: weight bias running_mean running_var num_batches_tracked
    layer4.1.conv3: weight
    layer4.1.bn3: weight bias running_mean running_var num_batches_tracked
    layer4.2.conv1: weight
    layer4.2.bn1: weight bias running_mean running_var num_batches_tracked
    layer4.2.conv2: weight
    layer4.2.bn2: weight bias running_mean running_var num_batches_tracked
    layer4.2.conv3: weight
    layer4.2.bn3: weight bias running_mean running_var num_batches_tracked
    fc: weight bias
"""
RESNET50_KEYS = [f"{module}.{leaf}" for line in RESNET50_KEYS_BY_MODULE.strip().splitlines()
                 for module, leaves in [line.strip().split(": ")] for leaf in leaves.split()]

# sum(p.numel() for p in torchvision.models.<name>().parameters()), fc(1000) included
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160}


def small_cfg(*overrides):
    return load_config("configs/embedded.yaml", [
        "model.embed_dim=64", "model.attention_dim=32", "model.text.width=64", "model.text.heads=4",
        "model.text.layers=1", *overrides])


def test_resnet50_state_dict_keys_match_torchvision():
    assert len(RESNET50_KEYS) == 320
    sd = build_resnet("resnet50").state_dict()
    assert list(sd) == RESNET50_KEYS
    assert tuple(sd["conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(sd["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    assert tuple(sd["fc.weight"].shape) == (1000, 2048)


@pytest.mark.parametrize("name", sorted(TORCHVISION_PARAMS))
def test_resnet_parameter_counts_match_torchvision(name):
    model = build_resnet(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


def test_resnet_stride_on_3x3_conv_and_zero_init_residual():
    model = build_resnet("resnet50", zero_init_residual=True)
    # torchvision's "v1.5": the bottleneck downsamples in its 3x3 conv, not its first 1x1
    assert model.layer2[0].conv1.stride == (1, 1) and model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)
    last_bns = [b.bn3 for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    assert all(torch.count_nonzero(bn.weight) == 0 for bn in last_bns)
    assert torch.all(build_resnet("resnet50").layer1[0].bn3.weight == 1)
    basic = build_resnet("resnet18", zero_init_residual=True)
    assert torch.count_nonzero(basic.layer3[1].bn2.weight) == 0


def test_resnet_forward_returns_stride32_map_and_pooled_vector():
    model = build_resnet("resnet18").eval()
    x = torch.randn(2, 3, 96, 64)
    fmap, pooled = model(x)
    assert fmap.shape == (2, 512, 3, 2) and pooled.shape == (2, 512)
    torch.testing.assert_close(pooled, fmap.mean((2, 3)))
    # channels-last in, channels-last out, same numbers
    model_cl = build_resnet("resnet18").eval().to(memory_format=torch.channels_last)
    model_cl.load_state_dict(model.state_dict())
    fmap_cl, pooled_cl = model_cl(x.to(memory_format=torch.channels_last))
    assert fmap_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fmap_cl, fmap, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pooled_cl, pooled, rtol=1e-4, atol=1e-4)


def test_text_encoder_masks_padding():
    model = build_model(small_cfg(), len(VOCAB)).eval()
    tokens = torch.tensor([[1, 2, 6, 10, 0, 0], [1, 2, 7, 11, 3, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    emb = model.encode_text(tokens, mask)
    tokens2 = tokens.clone()
    tokens2[0, 4:] = 5  # different ids under the padding
    torch.testing.assert_close(model.encode_text(tokens2, mask), emb)
    assert emb.shape == (2, 64) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))
    feats = torch.randn(2, 3, 4)
    torch.testing.assert_close(masked_mean(feats, torch.tensor([[1, 0, 0], [1, 1, 1]]).bool()),
                               torch.stack([feats[0, 0], feats[1].mean(0)]))
    with pytest.raises(ValueError, match="max_positions"):
        model.text(torch.zeros(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.bool))


def test_forward_contract_and_loss_wiring():
    cfg = small_cfg("loss.localization_weight=0.5", "loss.sigma=0.1")
    model = build_model(cfg, len(VOCAB)).eval()
    batch = make_batch(4, 64, torch.Generator().manual_seed(1))
    out = model(batch, return_attention=True)
    assert {"loss", "loss_contrastive", "loss_localization", "logit_scale", "image_emb",
            "text_emb", "num_loc_targets", "attention"} <= set(out)
    torch.testing.assert_close(out["loss"], out["loss_contrastive"] + 0.5 * out["loss_localization"])
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07), rtol=1e-4, atol=0)
    assert int(out["num_loc_targets"]) == int(batch["loc_mask"].sum()) == 4 * 4
    # the losses are the references on the model's own embeddings / projections
    fmap, pooled = model.visual(batch["images"])
    feats, caption = model.text(batch["tokens"], batch["attention_mask"])
    img, txt = model.contrastive.embed_image(pooled), model.contrastive.embed_text(caption)
    torch.testing.assert_close(out["loss_contrastive"], K.reference.contrastive_loss(
        img, txt, model.contrastive.log_scale()))
    q, k = model.attention.queries(feats), model.attention.keys(fmap)
    assert k.shape == (4, 4, 32)  # 64 px -> 2x2 grid
    torch.testing.assert_close(out["loss_localization"], K.reference.trace_attention_loss(
        q, k, batch["points_xy"], batch["point_weights"], batch["token_ranges"], batch["loc_mask"],
        (2, 2), 0.1, scale=1 / math.sqrt(32), loss_type="kl"))
    # evaluation helpers agree with the training path
    torch.testing.assert_close(model.encode_image(batch["images"]), out["image_emb"])
    torch.testing.assert_close(model.encode_text(batch["tokens"], batch["attention_mask"]), out["text_emb"])
    maps = model.attention_maps(batch)
    assert maps.shape == (4, 8, 2, 2)
    torch.testing.assert_close(maps, out["attention"])
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(4, 8))


def test_gradients_reach_every_trainable_parameter_and_param_groups_cover_them():
    model = build_model(small_cfg(), len(VOCAB))
    batch = make_batch(4, 64, torch.Generator().manual_seed(2))
    model(batch)["loss"].backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("visual.fc.") for n in trainable)
    no_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is None}
    assert not no_grad, no_grad  # no trainable tensor is left out of the graph (DDP / ZeRO)
    groups = model.param_groups()
    names = [g["name"] for g in groups]
    assert names == ["visual", "visual_no_decay", "textual", "textual_no_decay"]
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(trainable)
    by_name = {g["name"]: g for g in groups}
    assert any(p is model.contrastive.logit_scale for p in by_name["visual_no_decay"]["params"])
    assert all(p.ndim < 2 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    assert all(p.ndim >= 2 for g in groups if not g["name"].endswith("no_decay") for p in g["params"])
    assert by_name["textual"]["lr"] == model.cfg.optim.text_lr and by_name["visual"]["lr"] == model.cfg.optim.lr
    assert by_name["visual_no_decay"]["weight_decay"] == 0.0


def test_contrastive_only_baseline_skips_localization():
    model = build_model(small_cfg("loss.localization_weight=0"), len(VOCAB))
    batch = make_batch(4, 64, torch.Generator().manual_seed(3))
    out = model(batch)
    assert float(out["loss_localization"]) == 0.0
    torch.testing.assert_close(out["loss"], out["loss_contrastive"])
    out["loss"].backward()
    assert all(not p.requires_grad and p.grad is None for p in model.attention.parameters())
    assert all(not any(p is q for q in model.attention.parameters())
               for g in model.param_groups() for p in g["params"])
    assert model.attention_maps(batch).shape == (4, 8, 2, 2)  # still callable


def test_channels_last_model_matches_default():
    torch.manual_seed(0)
    a = build_model(small_cfg(), len(VOCAB)).eval()
    b = build_model(small_cfg("model.channels_last=true"), len(VOCAB)).eval()
    b.load_state_dict(a.state_dict())
    batch = make_batch(2, 64, torch.Generator().manual_seed(4))
    oa, ob = a(batch), b(batch)
    for key in ("loss_contrastive", "loss_localization", "image_emb"):
        torch.testing.assert_close(ob[key], oa[key], rtol=1e-4, atol=1e-4)
