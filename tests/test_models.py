"""Visual/textual backbones, heads and the LocTex model (issue 3)."""
import math

import pytest
import torch
import torchvision

import loctex.kernels as K
from loctex.config import load_config
from loctex.losses import build_loss
from loctex.models import build_model, build_resnet
from loctex.models.text import masked_mean

from _model_batches import VOCAB, make_batch

# The key layout of every checkpoint and export written so far: torchvision 0.28's
# resnet50().state_dict() keys, in order, one module per line. Pinned here (not read off the installed
# torchvision) so that a torchvision release that renamed a module could not break old files silently.
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
    assert list(model.state_dict()) == list(getattr(torchvision.models, name)(weights=None).state_dict())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_is_torchvisions_forward_up_to_avgpool(name):
    """Same weights in, bit-identical feature map and pooled vector out, against torchvision's
    own ``forward`` (fc replaced by the identity; the map read off ``layer4``)."""
    ours = build_resnet(name, zero_init_residual=False).eval()
    with torch.no_grad():  # BN statistics away from (0, 1), so that they matter
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    ref.load_state_dict(ours.state_dict())
    ref.fc = torch.nn.Identity()
    maps = []
    ref.layer4.register_forward_hook(lambda module, args, output: maps.append(output))
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        fmap, pooled = ours(x)
        ref_pooled = ref(x)
    assert fmap.shape == (2, ours.out_channels, 3, 4) and float(fmap.abs().max()) > 0
    assert torch.equal(fmap, maps[0]) and torch.equal(pooled, ref_pooled)


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


def test_forward_returns_embeddings_queries_and_keys():
    cfg = small_cfg("loss.localization_weight=0.5", "loss.sigma=0.1")
    model = build_model(cfg, len(VOCAB)).eval()
    batch = make_batch(4, 64, torch.Generator().manual_seed(1))
    out = model(batch, return_attention=True)
    assert not any(k.startswith("loss") for k in out)  # the objective is loctex.losses'
    assert out["grid_hw"] == (2, 2)  # 64 px -> 2x2 grid
    assert out["queries"].shape == (4, 8, 32) and out["keys"].shape == (4, 4, 32)
    assert out["attention_scale"] == pytest.approx(1 / math.sqrt(32))
    # logit_scale: a tensor of this forward (ZeRO-3 releases the parameter), with its gradient path
    ls = out["logit_scale"]
    assert ls.dim() == 0 and ls.requires_grad and ls is not model.contrastive.logit_scale
    assert ls.data_ptr() != model.contrastive.logit_scale.data_ptr()
    torch.testing.assert_close(ls.exp(), torch.tensor(1 / 0.07), rtol=1e-4, atol=0)
    # the outputs are the heads applied to the backbones' features
    fmap, pooled = model.visual(batch["images"])
    feats, caption = model.text(batch["tokens"], batch["attention_mask"])
    torch.testing.assert_close(out["image_emb"], model.contrastive.embed_image(pooled))
    torch.testing.assert_close(out["text_emb"], model.contrastive.embed_text(caption))
    torch.testing.assert_close(out["image_emb"].norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out["queries"], model.attention.queries(feats))
    torch.testing.assert_close(out["keys"], model.attention.keys(fmap))
    # keys are the grid cells row-major (h, w): cell (1, 0) is row 2
    torch.testing.assert_close(out["keys"][:, 2], model.attention.key_proj(fmap[:, :, 1, 0]))
    # evaluation helpers agree with the training path
    torch.testing.assert_close(model.encode_image(batch["images"]), out["image_emb"])
    torch.testing.assert_close(model.encode_text(batch["tokens"], batch["attention_mask"]), out["text_emb"])
    maps = model.attention_maps(batch)
    assert maps.shape == (4, 8, 2, 2)
    torch.testing.assert_close(maps, out["attention"])
    torch.testing.assert_close(maps.sum((2, 3)), torch.ones(4, 8))
    logits = torch.einsum("bld,bnd->bln", out["queries"], out["keys"]) / math.sqrt(32)
    torch.testing.assert_close(maps.reshape(4, 8, 4), torch.softmax(logits, -1))


def test_gradients_reach_every_trainable_parameter_and_param_groups_cover_them():
    cfg = small_cfg()
    model = build_model(cfg, len(VOCAB))
    batch = make_batch(4, 64, torch.Generator().manual_seed(2))
    build_loss(cfg)(model(batch), batch)["loss"].backward()
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


def test_contrastive_only_baseline_freezes_the_attention_head():
    cfg = small_cfg("loss.localization_weight=0")
    model = build_model(cfg, len(VOCAB))
    batch = make_batch(4, 64, torch.Generator().manual_seed(3))
    build_loss(cfg)(model(batch), batch)["loss"].backward()
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
    for key in ("image_emb", "keys", "queries"):
        torch.testing.assert_close(ob[key], oa[key], rtol=1e-4, atol=1e-4)
    assert b.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    # the engine's switch: the same numbers, and back
    a.set_channels_last()
    assert a.visual.layer4[1].conv2.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(a(batch)["image_emb"], oa["image_emb"], rtol=1e-4, atol=1e-4)
    a.set_channels_last(False)
    assert a.visual.conv1.weight.is_contiguous()


def test_model_and_objective_compile_without_graph_breaks():
    """``model.compile``: the forward is one graph (fullgraph=True fails on any break), and so is
    the objective with the kernels' custom ops, with the eager numbers. The C++ library is loaded
    first, as the engine's first eager use does; loading it inside the trace would break the graph."""
    assert K.cpp_available()
    cfg = small_cfg()
    torch.manual_seed(0)
    model = build_model(cfg, len(VOCAB)).eval()
    objective = build_loss(cfg)
    batch = make_batch(4, 64, torch.Generator().manual_seed(5))
    torch._dynamo.reset()
    eager = model(batch, return_attention=True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(batch, return_attention=True)
    for key in ("image_emb", "text_emb", "queries", "keys", "attention", "logit_scale"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-5, atol=1e-5)
    assert compiled["grid_hw"] == eager["grid_hw"] == (2, 2)

    def loss(b):
        return objective(model(b), b)["loss"]

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(loss, backend="aot_eager", fullgraph=True)(batch),
                               loss(batch), rtol=1e-5, atol=1e-5)


def test_embeddings_keep_the_heads_dtype_for_the_contrastive_kernel():
    from loctex.models.heads import ContrastiveHead
    head = ContrastiveHead(16, 8, 12, 2.0)
    x = torch.randn(5, 16) * 50
    fp32 = head.embed_image(x)
    bf16 = head.to(torch.bfloat16).embed_image(x.bfloat16())
    assert fp32.dtype == torch.float32 and bf16.dtype == torch.bfloat16
    torch.testing.assert_close(fp32.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(bf16.float().norm(dim=-1), torch.ones(5), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(bf16.float(), fp32, rtol=2e-2, atol=2e-2)
