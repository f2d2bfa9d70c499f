"""ViT and MLP-Mixer from timm as Pyro models: layer groups, BMR's unit structures, rebuild, training."""

import pytest
import torch
from configs import tiny_config
from pyro import poutine
from timm.layers import Attention, Mlp
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pyrozoo.bmr import prune, pruned_fraction
from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.bmr.units import effective_masks, find_units
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel, find_layers
from pyrozoo.nets import create_net


def tiny(name, **options):
    return create_net(name, in_channels=1, image_size=16, num_classes=4, preset="tiny", **options)


def test_paper_sizes():
    vit = create_net("vit", in_channels=1, image_size=32, num_classes=10)
    assert isinstance(vit, VisionTransformer)
    assert (vit.patch_embed.proj.kernel_size, vit.embed_dim, len(vit.blocks)) == ((4, 4), 256, 6)
    assert (vit.blocks[0].attn.num_heads, vit.blocks[0].mlp.fc1.out_features) == (8, 512)
    assert vit.pos_embed.shape == (1, 65, 256) and vit.cls_token.shape == (1, 1, 256)
    mixer = create_net("mixer", in_channels=3, image_size=32, num_classes=100)
    assert isinstance(mixer, MlpMixer) and len(mixer.blocks) == 6
    block = mixer.blocks[0]
    assert (block.mlp_tokens.fc1.in_features, block.mlp_tokens.fc1.out_features) == (64, 512)
    assert (block.mlp_channels.fc1.in_features, block.mlp_channels.fc1.out_features) == (256, 512)
    assert mixer.head.out_features == 100


def test_sizes_are_overridable_and_checked():
    assert len(create_net("vit", in_channels=1, image_size=32, num_classes=10, depth=2).blocks) == 2
    with pytest.raises(PyrozooError, match="preset"):
        create_net("mixer", in_channels=1, image_size=32, num_classes=10, preset="huge")
    with pytest.raises(PyrozooError, match="multiple of the head count"):
        create_net("vit", in_channels=1, image_size=32, num_classes=10, num_heads=7)


def test_every_parameter_is_random_and_only_weight_layers_are_prunable():
    net = tiny("vit")
    layers = find_layers(net)
    covered = set()
    for layer in layers:
        covered |= set(layer.split(layer.join(net)))
    assert covered == {name for name, _ in net.named_parameters()}
    kinds = {layer.name: layer.kind for layer in layers}
    assert kinds["cls_token"] == kinds["pos_embed"] == "tensor"
    assert kinds["blocks.0.norm1"] == kinds["norm"] == "norm"
    assert {layer.name for layer in layers if layer.prunable} == {
        layer.name for layer in layers if layer.kind == "weight" and layer.name != "head"
    }
    by_name = {layer.name: layer for layer in layers}
    assert by_name["pos_embed"].shape == (net.pos_embed.shape[1], 32)  # one row per position
    assert by_name["blocks.0.norm1"].shape == (32, 2)  # one row per feature: gain, bias
    norms_too = find_layers(net, prunable_kinds=("weight", "norm"))
    assert any(layer.prunable and layer.kind == "norm" for layer in norms_too)
    with pytest.raises(PyrozooError, match="unknown prunable kinds"):
        find_layers(net, prunable_kinds=("bias",))


def test_split_and_join_are_inverse_for_every_kind():
    net = tiny("vit")
    for layer in find_layers(net):
        for name, value in layer.split(layer.join(net)).items():
            assert torch.equal(value, net.get_parameter(name))


def test_a_timm_models_batch_norms_stay_deterministic_unless_selected_random():
    import timm

    net = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    model = BayesianModel(net)
    assert "conv1.1" not in {layer.name for layer in model.layers}  # timm's BatchNormAct2d
    assert model.net.get_submodule("conv1.1").weight.requires_grad  # a point estimate, trained
    random = BayesianModel(net, random=["conv1.1"])
    assert {layer.name: layer.kind for layer in random.layers}["conv1.1"] == "norm"


def test_any_module_becomes_a_model_whose_forward_uses_the_sampled_weights():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    model = BayesianModel(net)
    assert [layer.kind for layer in model.layers] == ["weight", "norm", "weight"]
    x = torch.randn(2, 1, 8, 8)
    weights = poutine.trace(model.sample_weights).get_trace().nodes["_RETURN"]["value"]
    hidden = nn.functional.conv2d(x, weights["0"][:, :9].reshape(4, 1, 3, 3), weights["0"][:, 9])
    hidden = nn.functional.group_norm(hidden, 2, weights["1"][:, 0], weights["1"][:, 1]).relu()
    expected = hidden.flatten(1) @ weights["4"][:, :-1].T + weights["4"][:, -1]
    got = model.logits(x, weights)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, net(x))  # the net's own parameters play no part


def _prune_units(model):
    """Prune weights at random, then kill head 0 of each attention (its value rows) and MLP neuron 0."""
    torch.manual_seed(3)
    for layer in model.layers:
        if layer.prunable:
            model.set_mask(layer.name, torch.rand(layer.shape) > 0.3)
    for units in find_units(model.net, model.layers):
        keep = {m.layer: model.mask(m.layer).bool() for m in units.producers}
        first = torch.arange(units.count) == 0
        for member in units.producers:
            member.put(keep[member.layer], first, False)
        for name, mask in keep.items():
            model.set_mask(name, mask)


@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_units_found_in_transformer_blocks(name):
    net = tiny(name)
    units = find_units(net)

    def short(layer):
        return layer.rsplit(".", 1)[-1]

    kinds = sorted(
        (short(u.producers[0].layer), short([m for m in u.consumers if m.layer != u.producers[0].layer][0].layer),
         u.count)
        for u in units
    )  # fmt: skip
    if name == "vit":  # the residual stream passes LayerNorms: its channels are fixed
        assert kinds == sorted([("qkv", "proj", 2), ("fc1", "fc2", 64)] * 2)
    else:
        assert kinds == [("fc1", "fc2", 64)] * 4  # timm: token hidden = ratio x width


def test_a_head_without_values_counts_its_projection_columns_as_pruned():
    model = BayesianModel(tiny("vit"))
    qkv = model.layers[[layer.name for layer in model.layers].index("blocks.0.attn.qkv")]
    keep = torch.ones(qkv.shape, dtype=torch.bool)
    keep[2 * 32 + 16 : 3 * 32] = False  # value rows of head 1 (head_dim 16)
    model.set_mask(qkv.name, keep)
    masks = effective_masks(model)
    assert not masks["blocks.0.attn.proj"][:, 16:32].any()
    assert masks["blocks.0.attn.proj"][:, :16].all() and masks["blocks.0.attn.proj"][:, 32].all()
    assert not masks["blocks.0.attn.qkv"][[16 + i for i in range(16)] + [48 + i for i in range(16)]].any()
    proj_rows = 32  # the dead head's query, key and value rows and its projection columns
    expected = (3 * 16 * 33 + proj_rows * 16) / sum(
        layer.shape.numel() for layer in model.layers if layer.prunable
    )
    assert pruned_fraction(model) == pytest.approx(expected)


@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_rebuilt_transformer_matches_the_model_and_is_smaller(name):
    model = BayesianModel(tiny(name))
    guide = make_guide("meanfield", model)
    _prune_units(model)
    x = torch.randn(3, 1, 16, 16)
    expected = model.logits(x, model.weights_from(guide.mean()))
    dense = rebuild(model, guide, remove_dead=False)
    sparse = rebuild(model, guide)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), expected)
        torch.testing.assert_close(sparse(x), expected, rtol=1e-4, atol=1e-5)
    assert parameter_count(sparse) < parameter_count(dense)
    assert type(sparse) is type(model.net)  # still a timm model
    mlps = [m for m in sparse.modules() if isinstance(m, Mlp)]
    assert mlps and all(m.fc1.out_features == m.fc2.in_features < 64 for m in mlps)
    if name == "vit":
        for block in sparse.blocks:
            assert isinstance(block.attn, Attention) and block.attn.num_heads == 1
            assert block.attn.qkv.out_features == 3 * 16 and block.attn.proj.in_features == 16


def test_an_attention_with_every_head_dead_keeps_one():
    model = BayesianModel(tiny("vit", depth=1))
    for layer in model.layers:
        if layer.name.endswith("qkv"):
            model.set_mask(layer.name, torch.zeros(layer.shape))
    guide = make_guide("meanfield", model)
    sparse = rebuild(model, guide)
    assert sparse.blocks[0].attn.num_heads == 1
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model.logits(x, model.weights_from(guide.mean())))


@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_bmr_ss_trains_prunes_and_exports_a_tiny_transformer(name, tmp_path):
    from pyrozoo.export import export
    from pyrozoo.train import Run

    changes = dict(method="bmr-ss", steps_per_epoch=4, batch_size=32, eval_batch_size=500, warmup_steps=2)
    config = tiny_config(net=name, net_options={"preset": "tiny"}, **changes)
    run = Run(config, tmp_path / "run", log=lambda text: None)
    metrics = run.train(progress=False)
    assert list(metrics["pruned_fraction"].notna()) == [True, True] and 0 <= metrics["accuracy"].iloc[-1] <= 1
    # a few steps barely move the posterior from its initialisation: prune everything to have units to cut
    assert prune(run.model, run.guide, "threshold", margin=-1e9, allow_empty=True).pruned_fraction == 1.0
    summary = export(run, tmp_path / "export", repeats=1)
    assert summary["units_cut"]["nonzero_parameters"] < summary["full_shapes"]["parameters"]
    program = torch.export.load(tmp_path / "export" / "sparse.pt2")
    x = run.data.x_test[:3]
    sparse = torch.load(tmp_path / "export" / "sparse_net.pt", weights_only=False)
    assert type(sparse) is type(run.model.net)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), sparse(x))


@pytest.mark.parametrize("prior", ["flat", "tiered"])
@pytest.mark.parametrize("name", ["vit", "mixer"])
def test_every_prior_gives_a_finite_training_step_on_every_kind_of_group(name, prior):
    from pyrozoo.models.priors import PRIORS
    from pyrozoo.steps import svi_step

    model = BayesianModel(tiny(name), prior=PRIORS[prior])
    guide = make_guide("meanfield", model)
    x, y = torch.randn(4, 1, 16, 16), torch.randint(0, 4, (4,))
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    losses = [svi_step(model, guide, optimizer, x, y, 100) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    trace = poutine.trace(model.sample_weights).get_trace()
    for layer in model.layers:  # each group, whatever its kind, has its latent and its own hyperparameters
        assert trace.nodes[layer.site]["value"].shape == layer.shape
        assert any(site.startswith(f"{layer.name}.") and site != layer.site for site in trace.nodes)
