"""Token rows of the head that never reach the output are left uncomputed (head_rows.py).

The plan must list exactly the layers whose rows cannot reach the output, change neither
the outputs nor the gradients at the target layer, and restore every layer's ``forward``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fam_core import FAM, GradFAM
from fam_core.anatomy.head_rows import find_row_plan, pruned_rows


class TwoTokens(nn.Module):
    """Embedding: tokens 0 and 2 of a per-token MLP after a token-mixing layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Linear(5, 5)  # mixes tokens: every row is needed before it
        self.up, self.down = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(tokens.transpose(1, 2)).transpose(1, 2)  # [B, 5, 4], rows mixed
        return self.down(torch.tanh(self.up(mixed)))[:, [0, 2]].flatten(1)


def test_the_plan_lists_the_rows_that_reach_the_output() -> None:
    model = TwoTokens().eval()
    tokens = torch.rand(2, 5, 4)
    plan = find_row_plan(model, lambda: model(tokens.clone().requires_grad_(True)), model(tokens))
    # `mix` acts on [B, 4, 5]: its rows are channels, all needed; up/down need tokens 0, 2
    assert plan == {"up": (0, 2), "down": (0, 2)}


def test_pruned_rows_keep_outputs_and_gradients_and_restore_forward() -> None:
    model = TwoTokens().eval()
    tokens = torch.rand(3, 5, 4, requires_grad=True)
    plan = {"up": (0, 2), "down": (0, 2)}
    direction = torch.randn(3, 6)
    expected = model(tokens)
    (expected_grad,) = torch.autograd.grad(expected, tokens, direction)
    with pruned_rows(model, plan):
        up_rows = model.up(torch.rand(3, 5, 4))
        pruned = model(tokens)
        (pruned_grad,) = torch.autograd.grad(pruned, tokens, direction)
    torch.testing.assert_close(pruned, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pruned_grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert up_rows[:, [1, 3, 4]].abs().max() == 0  # the other rows were not computed
    assert "forward" not in vars(model.up) and "forward" not in vars(model.down)
    with pytest.raises(RuntimeError, match="boom"), pruned_rows(model, plan):
        raise RuntimeError("boom")
    assert "forward" not in vars(model.up)


def test_a_plan_that_changes_the_output_is_dropped() -> None:
    model = TwoTokens().eval()
    tokens = torch.rand(2, 5, 4)
    wrong = model(tokens) + 1.0  # as if the real outputs differed from the pruned ones
    run = lambda: model(tokens.clone().requires_grad_(True))  # noqa: E731
    assert find_row_plan(model, run, wrong) == {}


def test_a_layer_called_twice_is_not_pruned() -> None:
    class Shared(nn.Module):  # the same layer reads every token, then token 0 only
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Linear(4, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            every = self.mlp(tokens).mean(dim=1)
            return every + self.mlp(tokens + 1.0)[:, 0]

    model = Shared().eval()
    tokens = torch.rand(2, 5, 4)
    assert find_row_plan(model, lambda: model(tokens.requires_grad_(True)), model(tokens)) == {}


def test_a_head_that_needs_every_row_gets_no_plan() -> None:
    class MeanTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Linear(4, 4)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.mlp(tokens).mean(dim=1)

    model = MeanTokens().eval()
    tokens = torch.rand(2, 5, 4)
    assert find_row_plan(model, lambda: model(tokens.requires_grad_(True)), model(tokens)) == {}


@pytest.mark.parametrize("method", [FAM, GradFAM])
def test_class_token_vit_explanations_are_unchanged_by_the_plan(method: type) -> None:
    hf_factories = pytest.importorskip("hf_factories")
    model = hf_factories.vit()
    explainer = method(model, input_size=64)
    references = explainer.embed(torch.rand(3, 3, 64, 64))
    images = torch.rand(2, 3, 64, 64)
    first = explainer(images, target=references)  # finds the plan after its own pass
    plan = explainer._row_plans[(64, 64)]
    last = f"layers.{len(model.layers) - 1}"
    assert plan == {
        f"{last}.attention.q_proj": (0,),
        f"{last}.attention.o_proj": (0,),
        f"{last}.mlp.fc1": (0,),
        f"{last}.mlp.fc2": (0,),
    }
    pruned = explainer(images, target=references)
    torch.testing.assert_close(pruned.maps, first.maps, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pruned.weights, first.weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(pruned.scores, first.scores, rtol=1e-5, atol=1e-6)
    assert not any("forward" in vars(module) for module in model.modules())
