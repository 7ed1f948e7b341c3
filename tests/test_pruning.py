"""Pruning: mask invariants, exact counts per criterion, application, rewinding, evaluation.

The model is a small MLP, initialized by ``init_module`` and trained a few Adam steps on real
MNIST images scaled by ``1/std`` without centering, so the always-zero border pixels keep
their ``fc1`` columns bit-identical: many ``|w - w0|`` scores are exactly 0 and tie.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cdi_experiments import datasets as ds
from cdi_experiments import modules as torch_init
from cdi_experiments import pruning as P

RANKED = ("magnitude", "movement", "magnitude_increase", "random")
WEIGHTS = ["fc1.weight", "fc2.weight", "fc3.weight"]


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 32)
        self.fc2 = nn.Linear(32, 16)
        self.fc3 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    if not ds.is_ready("mnist"):
        ds.fetch("mnist")
    images, labels = ds.load_tensors("mnist", train=True)
    x = images[:1024].reshape(1024, -1).float() / 255.0 / 0.3081  # (1024, 784), zeros stay 0
    return x, labels[:1024]


@pytest.fixture(scope="module")
def trained(mnist):
    """(model, plan): trained 12 Adam steps; tests deep-copy before changing it."""
    x, y = mnist
    torch.manual_seed(0)
    model = TinyMLP()
    plan = torch_init.init_module(model, 7, "he", layer_ids="name")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(12):
        idx = slice(64 * step, 64 * (step + 1))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, plan


def _evaluate_on(mnist):
    x, y = mnist

    def evaluate(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x[768:]).argmax(1) == y[768:]).double().mean())

    return evaluate


# ----------------------------------------------------------------------------- Mask


def test_mask_rejects_non_bool_dtype():
    with pytest.raises(ValueError, match="boolean"):
        P.Mask({"fc1.weight": torch.ones(2, 2)})


def test_mask_rejects_wrong_shape_unknown_name_and_empty(trained):
    model, _ = trained
    with pytest.raises(ValueError, match="shape"):
        P.Mask({"fc1.weight": torch.ones(784, 32, dtype=torch.bool)}, model)
    with pytest.raises(ValueError, match="no parameter 'fc9.weight'"):
        P.Mask({"fc9.weight": torch.ones(2, 2, dtype=torch.bool)}, model)
    with pytest.raises(ValueError, match="at least one"):
        P.Mask({})
    with pytest.raises(ValueError, match="torch.Tensor"):
        P.Mask({"fc1.weight": [[True]]})


def test_mask_sparsity_arithmetic():
    m = P.Mask(
        {
            "a": torch.tensor([[True, False, True], [False, True, True]]),
            "b": torch.tensor([True, True, False, True]),
        }
    )
    assert (m.numel, m.num_pruned, m.num_kept) == (10, 3, 7)
    assert m.sparsity == 0.3
    assert m.layer_pruned() == {"a": 2, "b": 1}
    assert m.layer_sparsity() == {"a": 2 / 6, "b": 0.25}


def test_intersection_only_loses_entries():
    g = torch.Generator().manual_seed(0)
    a = P.Mask({"w": torch.rand(50, 40, generator=g) > 0.3, "v": torch.rand(9, generator=g) > 0.5})
    b = P.Mask({"w": torch.rand(50, 40, generator=g) > 0.6, "v": torch.rand(9, generator=g) > 0.5})
    c = a & b
    assert c.is_subset_of(a) and c.is_subset_of(b)
    assert c.num_pruned >= max(a.num_pruned, b.num_pruned)
    assert torch.equal(c["w"], a["w"] & b["w"])
    assert not a.is_subset_of(c)  # a keeps entries that b prunes
    with pytest.raises(ValueError, match="different parameters"):
        a & P.Mask({"w": a["w"]})


def test_ones_like_covers_prunable_weights_only(trained):
    model, plan = trained
    m = P.Mask.ones_like(model, plan=plan)
    assert list(m) == WEIGHTS and m.num_pruned == 0
    with_biases = P.Mask.ones_like(model, plan=plan, include_biases=True)
    assert set(with_biases) == set(WEIGHTS) | {"fc1.bias", "fc2.bias", "fc3.bias"}


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.emb(tokens).transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        x = self.norm(x)
        x, _ = self.attn(x, x, x)
        return self.head(x.mean(1))  # (B, 3)


def test_prunable_names_are_layer_weights_and_pruning_works_on_conv_and_mha():
    model = Mixed()
    plan = torch_init.init_module(model, 0, "he")
    names = ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "head.weight"]
    assert P.prunable_names(model, plan) == names
    extra = P.prunable_names(model, plan, include_biases=True, include_embeddings=True)
    assert "emb.weight" in extra and "head.bias" in extra
    assert not any(n.startswith("norm.") for n in extra)
    mask = P.masks_at_sparsity(model, plan, "random", 0.5)[0.5]
    pruned = P.masked_copy(model, mask)
    assert pruned(torch.randint(0, 20, (4, 5))).shape == (4, 3)
    for name in names:
        assert torch.all(P.effective_weight(pruned, name)[~mask[name]] == 0), name


# ----------------------------------------------------------------------------- criteria


@pytest.mark.parametrize("threshold", [0.0, 1e-5, 1e-3])
def test_sleeping_mask_equals_independent_recomputation(trained, threshold):
    model, plan = trained
    mask = P.sleeping_mask(model, plan, threshold)
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        w0 = plan.initial(name)  # regenerated, never stored
        moved = (params[name].detach().double() - w0.double()).abs() > threshold
        assert torch.equal(mask[name], moved), name
    assert mask.num_pruned > 0  # the border pixels' columns never moved


def test_matched_masks_prune_exactly_the_reference_counts(trained):
    model, plan = trained
    reference = P.sleeping_mask(model, plan, 1e-5)
    matched = P.matched_masks(model, plan, reference, RANKED, seed=3)
    assert set(matched) == set(RANKED)
    for criterion, mask in matched.items():
        assert mask.layer_pruned() == reference.layer_pruned(), criterion
    # ranking the same |w - w0| to the same counts selects exactly the sleeping set
    assert matched["movement"] == reference


@pytest.mark.parametrize("criterion", RANKED)
def test_masks_at_sparsity_prune_exactly_round_f_numel(trained, criterion):
    model, plan = trained
    fractions = (0.0, 0.05, 0.3, 0.5, 0.77, 1.0)  # 0.05 lies inside the tie at |w - w0| = 0
    masks = P.masks_at_sparsity(model, plan, criterion, fractions, seed=1)
    assert list(masks) == list(fractions)
    for f, mask in masks.items():
        assert list(mask) == WEIGHTS
        for name, t in mask.items():
            assert t.numel() - int(t.sum()) == round(f * t.numel()), (criterion, f, name)


def test_magnitude_prunes_the_smallest_weights(trained):
    model, plan = trained
    mask = P.masks_at_sparsity(model, plan, "magnitude", 0.6)[0.6]
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        a = params[name].detach().abs()
        assert a[~mask[name]].max() <= a[mask[name]].min(), name


def test_magnitude_increase_prunes_the_lowest_gain(trained):
    model, plan = trained
    mask = P.masks_at_sparsity(model, plan, "magnitude_increase", 0.4)[0.4]
    params = dict(model.named_parameters())
    for name in WEIGHTS:
        gain = params[name].detach().abs() - plan.initial(name).abs()
        assert gain[~mask[name]].max() <= gain[mask[name]].min(), name


def test_random_is_deterministic_per_seed_and_differs_across_seeds(trained):
    model, plan = trained
    a = P.masks_at_sparsity(model, plan, "random", 0.5, seed=11)[0.5]
    b = P.masks_at_sparsity(model, plan, "random", 0.5, seed=11)[0.5]
    c = P.masks_at_sparsity(model, plan, "random", 0.5, seed=12)[0.5]
    assert a == b
    assert a != c and a.layer_pruned() == c.layer_pruned()


def test_unknown_or_threshold_criterion_is_a_value_error(trained):
    model, plan = trained
    with pytest.raises(ValueError, match="magnitude_increase"):
        P.get_criterion("snip")
    with pytest.raises(ValueError, match="movement"):
        P.masks_at_sparsity(model, plan, "sleeping", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        P.masks_at_sparsity(model, plan, "magnitude", 1.5)


# ----------------------------------------------------------------------------- application


def test_pruned_weights_are_zero_and_stay_zero_after_a_step(trained, mnist):
    model, plan = trained
    mask = P.masks_at_sparsity(model, plan, "magnitude", 0.5)[0.5]
    pruned = P.masked_copy(model, mask)
    assert not hasattr(model.fc1, "weight_orig")  # the original is untouched
    x, y = mnist
    opt = torch.optim.Adam(pruned.parameters(), lr=1e-2)
    before = {n: P.effective_weight(pruned, n).clone() for n in WEIGHTS}
    for name in WEIGHTS:
        assert torch.all(before[name][~mask[name]] == 0)
    loss = nn.functional.cross_entropy(pruned(x[:64]), y[:64])
    opt.zero_grad()
    loss.backward()
    opt.step()
    pruned(x[:1])  # the forward pre-hook recomputes weight = weight_orig * weight_mask
    for name in WEIGHTS:
        module = pruned.get_submodule(name.split(".")[0])
        w = module.weight.detach()
        assert torch.all(w[~mask[name]] == 0), name
        assert not torch.equal(w[mask[name]], before[name][mask[name]])  # the step did move
    assert P.Mask.from_model(pruned) == mask


def test_make_permanent_leaves_plain_params_with_zeros(trained):
    model, plan = trained
    mask = P.masks_at_sparsity(model, plan, "random", 0.3)[0.3]
    pruned = P.masked_copy(model, mask)
    effective = {n: P.effective_weight(pruned, n).clone() for n in WEIGHTS}
    P.make_permanent(pruned)
    names = dict(pruned.named_parameters())
    assert set(names) == {n for n, _ in model.named_parameters()}
    assert not any(b.endswith("_mask") for b, _ in pruned.named_buffers())
    for name in WEIGHTS:
        assert torch.equal(names[name].detach(), effective[name])
        assert torch.all(names[name].detach()[~mask[name]] == 0)


def test_rewind_and_mask_restores_survivors_bit_exactly(trained):
    model, plan = trained
    mask = P.masks_at_sparsity(model, plan, "magnitude", 0.7)[0.7]
    ticket = P.rewind_and_mask(copy.deepcopy(model), plan, mask)
    for name in WEIGHTS:
        w, w0, keep = P.effective_weight(ticket, name), plan.initial(name), mask[name]
        assert torch.equal(w[keep], w0[keep]), name
        assert torch.all(w[~keep] == 0), name
    for name in ("fc1.bias", "fc2.bias", "fc3.bias"):
        assert torch.equal(dict(ticket.named_parameters())[name].detach(), plan.initial(name))
    # iterating the step only ever loses entries
    second = P.masks_at_sparsity(model, plan, "random", 0.5, seed=5)[0.5]
    P.rewind_and_mask(ticket, plan, second)
    now = P.Mask.from_model(ticket)
    assert now == (mask & second) and now.is_subset_of(mask)


# ----------------------------------------------------------------------------- evaluation


def test_prune_and_evaluate_rows_columns_and_baseline(trained, mnist):
    model, plan = trained
    evaluate = _evaluate_on(mnist)
    state = copy.deepcopy(model.state_dict())
    finetuned_zeros = []

    def finetune(m: nn.Module) -> None:
        keep = P.Mask.from_model(m)
        finetuned_zeros.append(
            all(torch.all(P.effective_weight(m, n)[~keep[n]] == 0) for n in keep)
        )

    df = P.prune_and_evaluate(
        model,
        plan,
        evaluate,
        threshold=1e-5,
        sparsities=(0.5, 0.9),
        finetune_fn=finetune,
        retrain_fn=lambda m: None,
        seed=0,
    )
    assert list(df.columns) == [
        "criterion",
        "target",
        "sparsity",
        "num_pruned",
        "acc_before",
        "acc_after",
        "acc_delta",
        "acc_finetuned",
        "acc_rewound",
        "layer_sparsity",
    ]
    matched = df[df["target"] == "matched@1e-05"]
    assert list(matched["criterion"]) == list(P.DEFAULT_CRITERIA)
    assert matched["num_pruned"].nunique() == 1
    assert matched["sparsity"].iloc[0] == P.sleeping_mask(model, plan, 1e-5).sparsity
    for f in ("0.5", "0.9"):
        assert list(df[df["target"] == f]["criterion"]) == list(RANKED)
    assert len(df) == 5 + 2 * 4
    assert (df["acc_before"] == evaluate(model)).all()
    assert (df["acc_delta"] == df["acc_after"] - df["acc_before"]).all()
    assert finetuned_zeros and all(finetuned_zeros)
    assert json.loads(df["layer_sparsity"].iloc[-1]) == pytest.approx(
        {n: 0.9 for n in WEIGHTS}, abs=1e-3
    )
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # the model is untouched
    text = P.format_table(df)
    assert "magnitude_increase" in text and "layer_sparsity" not in text
