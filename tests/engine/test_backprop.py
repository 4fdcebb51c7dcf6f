"""Hessian backpropagation for Sequential MLPs (engine/backprop.py): every entry of every parameter against the dense
Hessian (fp64), and the engine's fall-back to HVPs wherever the recursion would not be exact."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from geomaudit.engine.audit import audit_checkpoint
from geomaudit.engine.backprop import exact_diagonals
from geomaudit.engine.hdiag import DiagonalEngine, MicroBatch

from .test_hdiag import assert_close, ce_loss, mse_loss


def deep_mlp(seed=0):
    """Every kind of step of the recursion: σ'' ≠ 0 (Tanh, Sigmoid, GELU: their diagonal turns into a factor at the
    next Linear down), σ'' = 0 (ReLU), Identity and an eval-mode Dropout passing through."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(5, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.GELU(), nn.Identity(),
                         nn.Linear(4, 3)).double().eval()


def data(n=10, seed=1, shape=(4,)):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, *shape, generator=g, dtype=torch.float64),
            "y": torch.randn(n, *shape[:-1], 3, generator=g, dtype=torch.float64),
            "c": torch.randint(0, 3, (n, *shape[:-1]), generator=g)}


def every_entry(model, loss, batch, pieces=1, **kw):
    n = len(batch["x"])
    micro = [MicroBatch({k: v[s::pieces] for k, v in batch.items()}, len(range(s, n, pieces)) / n)
             for s in range(pieces)]
    engine = DiagonalEngine(model, loss, micro, **kw)
    got = {name: engine.diagonal(name, np.arange(p.numel())) for name, p in model.named_parameters()}
    return got, engine.methods


class Loss(nn.Module):
    """``loss(model, batch)`` as a module, so that ``functional_call`` can vary one of the model's tensors even
    where the loss reads the model's parameters or layers directly."""

    def __init__(self, model, loss, batch):
        super().__init__()
        self.model, self.loss, self.batch = model, loss, batch

    def forward(self):
        return self.loss(self.model, self.batch)


def check(model, loss, batch, got):
    """Oracle: the dense Hessian (torch.autograd.functional.hessian) of the loss in each whole tensor, against the
    leading entries ``got`` holds of each tensor it names."""
    whole = Loss(model, loss, batch)
    for name, values in got.items():
        base = model.get_parameter(name).detach().clone()
        dense = torch.autograd.functional.hessian(
            lambda flat: functional_call(whole, {f"model.{name}": flat.reshape(base.shape)}, ()), base.reshape(-1))
        want = dense.diagonal()[: len(values)]
        if dense.diagonal().abs().max() == 0:  # the loss is linear in this tensor
            assert torch.equal(values, want), name
        else:
            assert_close(values, want)


def seq_ce(model, t):
    """Cross-entropy over every (example, token) row of a (N, T, F) input."""
    return nn.functional.cross_entropy(model(t["x"]).flatten(0, 1), t["c"].flatten())


@pytest.mark.parametrize("loss", [mse_loss, ce_loss, seq_ce], ids=["mse", "cross-entropy", "tokens"])
def test_every_entry_of_every_layer_matches_the_dense_hessian(loss):
    model = deep_mlp()
    batch = data(shape=(3, 4)) if loss is seq_ce else data()
    got, methods = every_entry(model, loss, batch)
    assert set(methods.values()) == {"hessian-backprop"}
    check(model, loss, batch, got)


def test_micro_batches_add_up():
    model, batch = deep_mlp(), data(n=12)
    got, methods = every_entry(model, ce_loss, batch, pieces=3)
    assert set(methods.values()) == {"hessian-backprop"}
    check(model, ce_loss, batch, got)


def test_backprop_can_be_turned_off_and_agrees_with_the_hvps():
    model, batch = deep_mlp(), data()
    fast, _ = every_entry(model, mse_loss, batch)
    slow, methods = every_entry(model, mse_loss, batch, backprop=False)
    assert set(methods.values()) == {"hvp-output"}  # Linear layers: the HVP through their outputs
    for name in fast:
        assert_close(fast[name], slow[name], rtol=1e-10)


def weight_decay(model, t):
    return mse_loss(model, t) + 0.1 * (model[0].weight ** 3).sum()


def coupled_rows(model, t):
    return model(t["x"]).sum(0).pow(2).sum()  # (Σ_n z_n)²: the loss Hessian couples every pair of rows


def hidden_penalty(model, t):
    return mse_loss(model, t) + model[:2](t["x"]).pow(4).mean()  # an activation used besides the output


def twice(model, t):
    return mse_loss(model, t) + mse_loss(model, t)


def linear_output_loss(model, t):
    return (model(t["x"]) * t["y"]).mean()


@pytest.mark.parametrize("loss", [weight_decay, coupled_rows, hidden_penalty, twice],
                         ids=["parameter-in-loss", "coupled-rows", "hidden-activation", "called-twice"])
def test_losses_the_recursion_does_not_cover_fall_back_to_hvps(loss):
    model, batch = deep_mlp(), data()
    got, methods = every_entry(model, loss, batch)
    penalised = {"0.weight"} if loss is weight_decay else set()  # a second use of it: the tensor's own HVPs
    assert methods == {name: "hvp" if name in penalised else "hvp-output" for name in got}
    check(model, loss, batch, got)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.0), nn.Linear(6, 3)).double().train(),
    nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double().eval(),
    nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.Tanh()), nn.Linear(6, 3)).double().eval(),
], ids=["dropout-training", "layernorm", "nested"])
def test_models_the_recursion_does_not_cover_fall_back_to_hvps(model):
    batch = data()
    got, methods = every_entry(model, mse_loss, batch)
    assert set(methods.values()) == {"hvp-output"}  # Linear and LayerNorm layers, one call each
    check(model, mse_loss, batch, got)


def test_a_loss_linear_in_the_output_gives_exact_zeros_at_the_last_layer():
    model, batch = deep_mlp(), data()
    got, methods = every_entry(model, linear_output_loss, batch)
    assert set(methods.values()) == {"hessian-backprop"}
    assert torch.equal(got["10.weight"], torch.zeros(12, dtype=torch.float64))
    check(model, linear_output_loss, batch, got)


def test_the_audit_reports_which_method_ran():
    model, batch = deep_mlp(), data()
    result = audit_checkpoint(model, mse_loss, [MicroBatch(batch, 1.0)], ["0.weight", "10.bias"], coords=5, seed=0)
    assert [la.h_diag_method for la in result.layers] == ["hessian-backprop"] * 2
    result = audit_checkpoint(model, weight_decay, [MicroBatch(batch, 1.0)], ["0.weight"], coords=5, seed=0)
    assert result.layers[0].h_diag_method == "hvp"
    assert result.layers[0].to_dict()["h_diag_method"] == "hvp"
    model, batch = cnn(), images()
    result = audit_checkpoint(model, ce_loss, [MicroBatch(batch, 1.0)], ["0.weight", "6.bias"], coords=5, seed=0)
    assert [la.to_dict()["h_diag_method"] for la in result.layers] == ["hessian-backprop"] * 2
    hvps = DiagonalEngine(model, ce_loss, [MicroBatch(batch, 1.0)], backprop=False)
    for la in result.layers:
        assert_close(torch.as_tensor(la.h_diag), hvps.diagonal(la.name, la.indices), rtol=1e-10)


def test_a_tensor_audited_alone_stops_the_recursion_there_and_ignores_penalties_on_others():
    """Only the wanted tensors require grad: a penalty on a lower layer's weight leaves their Hessian (and the
    recursion) exact, while the penalised tensor itself, asked for, takes HVPs."""
    model, batch = deep_mlp(), data()
    top = ["7.weight", "10.weight", "10.bias"]
    engine = DiagonalEngine(model, weight_decay, [MicroBatch(batch, 1.0)], layers=top)
    got = {name: engine.diagonal(name, np.arange(model.get_parameter(name).numel())) for name in top}
    assert engine.methods == dict.fromkeys(top, "hessian-backprop")
    engine = DiagonalEngine(model, weight_decay, [MicroBatch(batch, 1.0)], layers=["0.weight", "7.weight"])
    got |= {name: engine.diagonal(name, np.arange(model.get_parameter(name).numel())) for name in ["0.weight"]}
    assert engine.methods == {"0.weight": "hvp"}
    check(model, weight_decay, batch, got)


def test_a_weight_tied_between_two_layers_takes_the_hvps_through_both_outputs():
    torch.manual_seed(0)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight  # one tensor, two layers: its diagonal is not the sum of the two layers' terms
    model, batch = nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 3)).double().eval(), data()
    got, methods = every_entry(model, mse_loss, batch)
    assert set(methods.values()) == {"hvp-output"}  # the whole model: the tied tensor is a parameter of it
    check(model, mse_loss, batch, got)


@pytest.mark.parametrize("one, method", [(True, "hvp-output"), (False, "hessian-backprop")], ids=["one", "all"])
def test_the_cheaper_method_runs(one, method):
    """The cost rule: one HVP for one coordinate of one tensor costs less than the recursion's three (one per output
    unit) and its eigendecompositions; for every coordinate of every tensor the recursion costs less."""
    model, batch = deep_mlp(), data()
    names = ["10.weight"] if one else [n for n, _ in model.named_parameters()]
    engine = DiagonalEngine(model, mse_loss, [MicroBatch(batch, 1.0)], layers=names)
    got = {n: engine.diagonal(n, np.arange(1 if one else model.get_parameter(n).numel())) for n in names}
    assert set(engine.methods.values()) == {method}
    check(model, mse_loss, batch, got)


def images(n=6, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64),
            "c": torch.randint(0, 3, (n,), generator=g)}


def cnn(seed=0, top=nn.ReLU):
    """Every step a CNN adds: convolutions with padding, stride and dilation, max and average pooling, Flatten, and a
    curved activation in the head whose term becomes a factor that travels down through all of them."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 2, stride=1),
                         top(), nn.AvgPool2d(2, stride=1), nn.Conv2d(4, 3, 2, padding=1, dilation=2), nn.Flatten(),
                         nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()


def test_every_entry_of_every_layer_of_a_cnn_matches_the_dense_hessian():
    model, batch = cnn(), images()
    got, methods = every_entry(model, ce_loss, batch)
    assert set(methods.values()) == {"hessian-backprop"}
    check(model, ce_loss, batch, got)


def test_a_curved_activation_above_a_convolution_is_exact_there_and_not_below():
    """Tanh above the second convolution: its term lands on that convolution exactly, but would have to become a
    factor of the whole feature map's rank to go further down, so an audit that includes the first one takes HVPs."""
    model, batch = cnn(top=nn.Tanh), images()
    upper = ["3.weight", "3.bias", "6.weight", "8.weight"]
    engine = DiagonalEngine(model, ce_loss, [MicroBatch(batch, 1.0)], layers=upper)
    got = {n: engine.diagonal(n, np.arange(model.get_parameter(n).numel())) for n in upper}
    assert set(engine.methods.values()) == {"hessian-backprop"}
    check(model, ce_loss, batch, got)
    for model in (model, nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(3, 3, 3), nn.Tanh(), nn.Flatten(),
                                       nn.Linear(48, 3)).double().eval()):  # through a pooling, a convolution
        got, methods = every_entry(model, ce_loss, batch)
        assert "hessian-backprop" not in methods.values()
        check(model, ce_loss, batch, got)


def test_a_linear_over_the_last_axis_of_an_image_takes_the_hvps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Linear(6, 2), nn.Flatten(), nn.Linear(36, 3)).double().eval()
    batch = images()
    got, methods = every_entry(model, ce_loss, batch)
    assert "hessian-backprop" not in methods.values()
    check(model, ce_loss, batch, got)


def test_a_convolution_wider_than_the_budget_is_taken_a_slice_of_the_rank_at_a_time():
    """A 7 × 7 kernel over 8 × 8 inputs: each rank column's (rows, C_out, C_in·7·7) products take 14 kB, so a 20 kB
    budget computes the rank-3 factor's three columns one by one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 7), nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double().eval()
    batch = images()
    got = exact_diagonals(model, ce_loss, [MicroBatch(batch, 1.0)], 20_000, ["0.weight", "0.bias"])
    assert got is not None
    check(model, ce_loss, batch, got)


def test_an_eval_mode_batchnorm_is_a_per_channel_affine_map():
    """BatchNorm2d with running statistics (eval): its γ and β and the convolution below it against the dense Hessian,
    with a Tanh whose term goes through it, and one without affine map; in training mode (batch statistics couple the
    rows) the HVPs."""
    torch.manual_seed(0)
    norm = nn.BatchNorm2d(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.Tanh(), nn.BatchNorm2d(3, affine=False), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(27, 3)).double()
    with torch.no_grad():  # statistics and an affine map far from the defaults
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2)
        norm.weight.uniform_(0.5, 2), norm.bias.uniform_(-1, 1)
    model.eval()
    batch = images()
    got, methods = every_entry(model, ce_loss, batch)
    assert set(methods.values()) == {"hessian-backprop"}
    check(model, ce_loss, batch, got)
    model.train()
    got, methods = every_entry(model, ce_loss, batch)
    assert "hessian-backprop" not in methods.values()
    check(model, ce_loss, batch, got)
