"""Foundation: units, data flow, MACs and the cascade, for every family's tiny model."""
import numpy as np
import pytest
import torch
import torch_pruning as tp

from conftest import TINY
from diffprune.errors import DiffpruneError
from diffprune.models import OUTPUT, build_graph, count_params, get_adapter
from diffprune.zoo import build


def _descendants(graph, unit):
    seen, todo = set(), [unit]
    while todo:
        for c in graph.consumers[todo.pop()]:
            if c != OUTPUT and c not in seen:
                seen.add(c)
                todo.append(c)
    return seen


def _unit_outputs(model, units, run, perturb=None):
    """Run once, recording each unit's first output tensor; optionally perturb one unit's output."""
    outs, handles = {}, []
    mods = dict(model.named_modules())
    for u in units:
        def hook(mod, args, out, u=u):
            if u == perturb:
                out = out + 0.5 if torch.is_tensor(out) else type(out)(
                    (o + 0.5 if torch.is_tensor(o) else o) for o in out)
            first = out if torch.is_tensor(out) else next(o for o in out if torch.is_tensor(o))
            outs[u] = first.detach().clone()
            return out
        handles.append(mods[u].register_forward_hook(hook))
    try:
        with torch.no_grad():
            final = run()
    finally:
        for h in handles:
            h.remove()
    return outs, final


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_units_and_remainder_account_for_all_macs(name, granularity):
    model = build(name)
    graph = build_graph(model, granularity)
    adapter = get_adapter(model)
    x, t, cond = adapter.example_inputs(model)

    class Call(torch.nn.Module):  # torch-pruning's counter wants one positional input
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return adapter.predict_noise(self.model, x, t, cond)

    independent, params = tp.utils.count_ops_and_params(Call(), example_inputs=x)
    assert graph.total_macs == int(independent)
    assert graph.total_params == count_params(model) == params
    assert all(graph.macs[u] > 0 for u in graph.units), graph.macs
    assert graph.always_run_macs > 0
    assert len(set(graph.units)) == graph.n_units >= 2


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("granularity", ["coarse", "fine"])
def test_perturbing_a_unit_changes_exactly_its_downstream_units(name, granularity):
    model = build(name)
    graph = build_graph(model, granularity)
    adapter = get_adapter(model)
    x, t, cond = adapter.example_inputs(model)
    run = lambda: adapter.predict_noise(model, x, t, cond)  # noqa: E731
    base, base_out = _unit_outputs(model, graph.units, run)
    for u in graph.units:
        outs, out = _unit_outputs(model, graph.units, run, perturb=u)
        changed = {v for v in graph.units if v != u and not torch.equal(outs[v], base[v])}
        assert changed == _descendants(graph, u), (u, changed)
        assert not torch.equal(out, base_out)  # every unit reaches the output


def test_unet_data_flow_has_skip_connections():
    g = build_graph(build("tiny-sd"))
    assert g.units == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert g.consumers["down_blocks.0"] == ["down_blocks.1", "up_blocks.0", "up_blocks.1"]
    assert g.consumers["mid_block"] == ["up_blocks.0"]
    assert g.consumers["up_blocks.1"] == [OUTPUT]


def test_cascade_on_hand_checked_tables():
    g = build_graph(build("tiny-sd"))
    m = g.macs
    rest = g.always_run_macs
    d0, d1, mid, u0, u1 = g.units
    # keep all: everything runs
    assert g.step_macs([1, 1, 1, 1, 1]) == g.total_macs
    # skip the last up block: the step is the cached prediction, nothing upstream is needed
    assert g.live_units([1, 1, 1, 1, 0]).tolist() == [False] * 5
    assert g.step_macs([1, 1, 1, 1, 0]) == rest
    # skip up_blocks.0: mid and down_blocks.1 only fed it (mid) or it and mid -> dead; d0 still feeds u1
    assert g.live_units([1, 1, 1, 0, 1]).tolist() == [True, False, False, False, True]
    assert g.step_macs([1, 1, 1, 0, 1]) == rest + m[d0] + m[u1]
    # skip mid only: d1 still feeds u0 directly (skip connection), so it stays live
    assert g.live_units([1, 1, 0, 1, 1]).tolist() == [True, True, False, True, True]
    # skip d0: everything else live (they read d0's cached output)
    assert g.step_macs([0, 1, 1, 1, 1]) == g.total_macs - m[d0]
    table = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 1], [1, 1, 1, 1, 0]], dtype=bool)
    assert g.schedule_macs(table) == g.total_macs + rest + m[d0] + m[u1] + rest


def test_transformer_cascade_is_a_chain():
    g = build_graph(build("tiny-dit"))
    assert g.units == ["transformer_blocks.0", "transformer_blocks.1"]
    assert g.live_units([1, 0]).tolist() == [False, False]
    assert g.live_units([0, 1]).tolist() == [False, True]


def test_fine_units_cover_resnets_attentions_and_resamplers():
    g = build_graph(build("tiny-sd"), "fine")
    assert "down_blocks.0.resnets.0" in g.units and "down_blocks.0.attentions.0" in g.units
    assert "down_blocks.0.downsamplers.0" in g.units and "up_blocks.0.upsamplers.0" in g.units
    assert g.consumers["down_blocks.0.resnets.0"] == ["down_blocks.0.attentions.0"]
    gd = build_graph(build("tiny-pixart"), "fine")
    assert gd.units[:3] == ["transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"]


def test_real_size_cifar_architecture_numbers():
    g = build_graph(build("ddpm-cifar10"))
    assert g.total_params == 35_746_307
    # torch-pruning 1.6's convention; the Diff-Pruning paper's older counter printed 6.0655G
    assert round(g.total_macs / 1e9, 4) == 6.0641
    assert g.n_units == 9


def test_unsupported_family_and_bad_shapes_are_clear_errors():
    with pytest.raises(DiffpruneError, match="not supported.*UNet2DModel"):
        get_adapter(torch.nn.Linear(2, 2))
    model = build("tiny-unet")
    with pytest.raises(DiffpruneError, match="multiple of 2"):
        build_graph(model, height=15, width=16)
    with pytest.raises(DiffpruneError, match="granularity"):
        build_graph(model, "medium")
    with pytest.raises(DiffpruneError, match=r"\(batch, 1, H, W\)"):
        get_adapter(model).check_input(model, torch.zeros(1, 3, 16, 16))


def test_macs_scale_with_batch_and_resolution():
    model = build("tiny-unet")
    g1, g2 = build_graph(model), build_graph(model, batch=2)
    # linear biases count once per output feature (torch-pruning's convention), so not exactly 2x
    assert sum(g2.macs.values()) == pytest.approx(2 * sum(g1.macs.values()), rel=1e-3)
    g4 = build_graph(model, height=32, width=32)
    assert g4.input_shape == (1, 1, 32, 32) and g4.total_macs > 3 * g1.total_macs
