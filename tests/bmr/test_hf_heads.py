"""A Hugging Face BERT's attention heads are units (issue 28): a head is its rows of ``query``, ``key`` and
``value`` and its columns of the sibling ``output.dense``; a head whose value rows are all pruned leaves the
rebuilt net, still a ``BertForSequenceClassification`` with fewer heads, which computes the reduced Bayesian
model's outputs and goes through ``torch.export``. Skipped where transformers is not installed."""

import pytest
import torch

pytest.importorskip("transformers")

from pyrozoo.bmr.compact import compact  # noqa: E402
from pyrozoo.bmr.forced import forced_prune_check, tiny_bert  # noqa: E402
from pyrozoo.bmr.rebuild import parameter_count, rebuild  # noqa: E402
from pyrozoo.bmr.units import structure  # noqa: E402
from pyrozoo.guides import make_guide  # noqa: E402
from pyrozoo.models import BayesianModel  # noqa: E402

ATTENTION = "bert.encoder.layer.{}.attention"


def _model(**options):
    net, x = tiny_bert()
    model = BayesianModel(net, example_input=x, output_key="logits", **options).eval()
    return model, make_guide("meanfield", model), x


def _silence_value_rows(model, heads):
    """Prune every value row (weight and bias) of ``heads`` in each layer: those heads output exactly 0."""
    for layer in range(2):
        name = f"{ATTENTION.format(layer)}.self.value"
        keep = model.mask(name).bool().clone()
        for head in heads:
            keep[head * 8 : (head + 1) * 8] = False
        model.set_mask(name, keep)


def test_the_heads_of_a_bert_self_attention_are_units_and_nothing_says_they_stay():
    model, _, _ = _model()
    found = structure(model)
    heads = {u.heads_of: u for u in found.units if u.heads_of is not None}
    assert set(heads) == {f"{ATTENTION.format(i)}.self" for i in range(2)}
    units = heads[f"{ATTENTION.format(0)}.self"]
    assert units.count == 4 and units.zero_preserving
    roles = {(m.layer.rsplit(".", 1)[-1], m.axis, m.produces): tuple(m.index.shape) for m in units.members}
    assert roles == {
        ("value", 0, True): (4, 8), ("query", 0, False): (4, 8), ("key", 0, False): (4, 8),
        ("dense", 1, False): (4, 8),
    }  # fmt: skip
    assert torch.equal(units.members[0].index[1], torch.arange(8, 16))  # head 1: rows 8..15
    assert not any("attention heads stay" in why for why in found.fixed.values())


def test_pruned_value_rows_take_their_heads_out_of_the_rebuilt_bert_and_the_others_stay():
    model, guide, x = _model()
    dense = rebuild(model, guide, remove_dead=False)
    torch.export.export(dense, (x,))  # the dense net exports: so must the rebuilt one
    _silence_value_rows(model, heads=(0, 2))
    with torch.no_grad():
        expected = model.logits(x, model.weights_from(guide.mean()))
        assert not torch.allclose(dense(x).logits, expected, atol=1e-4)  # the pruned heads did contribute
    sparse = rebuild(model, guide)
    for layer in range(2):
        attention = sparse.get_submodule(ATTENTION.format(layer))
        before = dense.get_submodule(ATTENTION.format(layer))
        assert (attention.self.num_attention_heads, attention.self.all_head_size) == (2, 16)
        assert attention.self.query.out_features == attention.self.value.out_features == 16
        assert attention.output.dense.in_features == 16
        kept = torch.cat([torch.arange(8, 16), torch.arange(24, 32)])  # heads 1 and 3, not pruned: kept
        torch.testing.assert_close(attention.self.key.weight, before.self.key.weight[kept])
        torch.testing.assert_close(attention.output.dense.weight, before.output.dense.weight[:, kept])
    assert parameter_count(sparse) < parameter_count(dense)
    torch.testing.assert_close(sparse(x).logits, expected, rtol=1e-5, atol=1e-5)
    program = torch.export.export(sparse, (x,))
    torch.testing.assert_close(program.module()(x).logits, expected, rtol=1e-5, atol=1e-5)


def _tiny_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, num_labels=3,
    )  # fmt: skip
    return ViTForImageClassification(config).eval(), torch.randn(2, 3, 16, 16)


@pytest.mark.parametrize("make", [tiny_bert, _tiny_vit], ids=["bert", "vit"])
def test_the_forced_prune_check_removes_half_of_the_heads(make):
    """BERT's layout (query, key, value; the parent's output.dense) and ViT's (q_proj, k_proj, v_proj, o_proj
    in transformers 5; BERT's before)."""
    net, x = make()
    found = forced_prune_check(net, x, output_key="logits", heads=True)
    assert found.passed, found
    assert found.forced_heads == found.removed_heads == 4  # every other head of two layers of 4


def test_compaction_cuts_a_berts_dead_heads_and_their_count_follows():
    model, guide, x = _model()
    _silence_value_rows(model, heads=(1,))
    with torch.no_grad():
        before = model.logits(x, model.weights_from(guide.mean()))
    removed, note = compact(model, guide)
    assert removed == 2 and note == ""
    assert model.net.get_submodule(f"{ATTENTION.format(0)}.self").num_attention_heads == 3
    with torch.no_grad():
        after = model.logits(x, model.weights_from(guide.mean()))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_bert_with_a_deterministic_query_keeps_its_heads_and_says_why():
    model, _, _ = _model(deterministic=[f"{ATTENTION.format(0)}.self.query"])
    fixed = structure(model).fixed
    assert fixed[f"{ATTENTION.format(0)}.self"] == (
        "its 4 attention heads stay: its query, key, value or output layer is deterministic (make all four "
        "random to let heads go)"
    )
    assert [u.heads_of for u in structure(model).units if u.heads_of] == [f"{ATTENTION.format(1)}.self"]
