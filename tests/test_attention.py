"""Attention that uses its weight layers functionally, rerouted to call them as modules (``attention.py``)."""
from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models.swin_transformer import (PatchMergingV2, ShiftedWindowAttention, ShiftedWindowAttentionV2,
                                                 SwinTransformer, SwinTransformerBlockV2)

import icrewrite
from icrewrite import ConversionError
from icrewrite.layers import RoutedMultiheadAttention
from icrewrite.rewrite import find_reroute, route
from icrewrite.checkpoint import load, save
from icrewrite.testing import check_conversion, randomize_norms
from icrewrite.rewrite import trace_scopes


def torchvision_vit() -> nn.Module:
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    nn.init.normal_(model.heads.head.weight, std=0.1)  # torchvision starts it at zero: outputs would all be 0
    return model


def torchvision_swin(v2: bool = False) -> nn.Module:
    """Windows of 3 on 10x10 and 5x5 maps: padded and shifted windows both occur."""
    blocks = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[3, 3],
                           stochastic_depth_prob=0.0, **blocks)


def timm_small(name: str, side: int, **kwargs) -> nn.Module:
    """A timm model built for ``side`` x ``side`` inputs (its probe and checkpoint probe use that size too)."""
    return timm.create_model(name, img_size=side, pretrained_cfg_overlay={"input_size": (3, side, side)}, **kwargs)


# name -> (builder, input side, attention modules that need a reroute)
MODELS = {
    "timm-eva02": (lambda: timm_small("eva02_tiny_patch14_224", 28, depth=2), 28, 2),
    "timm-beit": (lambda: timm_small("beit_base_patch16_224", 32, depth=2, embed_dim=32, num_heads=2), 32, 2),
    "timm-swinv2": (lambda: timm_small("swinv2_tiny_window8_256", 32, window_size=2, embed_dim=16, depths=(2, 2),
                                       num_heads=(2, 2)), 32, 4),
    "torchvision-vit": (torchvision_vit, 32, 2),
    "torchvision-swin": (torchvision_swin, 40, 4),
    "torchvision-swin-v2": (lambda: torchvision_swin(v2=True), 40, 4),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rerouted_attention_passes_every_conversion_check(name):
    """Eval function preserved, IC directly before qkv/proj/out_proj (normalised, half dropped
    at p=0.5), plan = measured parameters, idempotent, backward reaches every parameter."""
    build, side, attentions = MODELS[name]
    model = build()
    the_plan = icrewrite.plan(model)
    assert the_plan.count("route-through-module") == attentions
    assert not [n for n in the_plan.notes if "used functionally" in n.reason]
    result = check_conversion(model, torch.randn(4, 3, side, side))
    assert result.ok, result.failures


class _InProjectionInput(TorchFunctionMode):
    """Record what a packed in-projection weight is applied to (``F.linear(x, weight)``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight, self.inputs = weight, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and args[1] is self.weight:
            self.inputs.append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("p", [0.0, 0.5])
def test_multihead_attention_in_projection_reads_its_ic(p):
    """The packed in_proj_weight is applied to a normalised input (p=0), half of it zero (p=0.5)."""
    converted = icrewrite.convert(torchvision_vit(), init="fresh", p=p).train()
    attention = converted.encoder.layers[0].self_attention
    with _InProjectionInput(attention.in_proj_weight) as recorder:
        converted(torch.randn(8, 3, 32, 32) * 3 + 1)
    (x,) = recorder.inputs
    if p == 0.0:
        torch.testing.assert_close(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4, rtol=0)
        torch.testing.assert_close(x.var(0, unbiased=False), torch.ones(x.shape[1]), atol=1e-3, rtol=0)
    else:
        assert 0.4 <= (x == 0).float().mean().item() <= 0.6


def _outputs_and_grads(module: nn.Module, *inputs: torch.Tensor, **kwargs) -> list[torch.Tensor]:
    out = module(*inputs, **kwargs)
    tensors = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in tensors).backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for _, p in sorted(module.named_parameters())]
    return [t.detach() for t in tensors] + grads


def _assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("cls", [ShiftedWindowAttention, ShiftedWindowAttentionV2])
@pytest.mark.parametrize("shift", [[0, 0], [1, 1]])
def test_routed_window_attention_is_torchvisions_in_training_too(cls, shift):
    """Class swap alone (no IC): same output and gradients as torchvision's function, train mode,
    on a 5x7 map (padded to windows of 3); V2's unused key bias keeps a zero gradient."""
    torch.manual_seed(0)
    attention = cls(8, window_size=[3, 3], shift_size=shift, num_heads=2).train()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_()
    routed = copy.deepcopy(attention)
    reroute = find_reroute(routed, [])
    assert reroute is not None and set(reroute.layers) == {"qkv", "proj"}
    route(routed, reroute)
    assert isinstance(routed, cls) and type(routed) is not cls
    x = torch.randn(2, 5, 7, 8)
    _assert_same(_outputs_and_grads(routed, x), _outputs_and_grads(attention, x))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_routed_multihead_attention_is_torchs_in_training_too(batch_first, need_weights):
    """With its input IC taken out, the routed class computes what nn.MultiheadAttention does:
    output, attention weights and gradients, in train mode."""
    attention = nn.MultiheadAttention(8, 2, batch_first=batch_first).train()
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.normal_()
    routed = copy.deepcopy(attention)
    routed.__class__ = RoutedMultiheadAttention
    routed.ic = nn.Identity()
    x = torch.randn(3, 5, 8)
    _assert_same(_outputs_and_grads(routed, x, x, x, need_weights=need_weights),
                 _outputs_and_grads(attention, x, x, x, need_weights=need_weights))


class CrossAttention(nn.Module):
    """Image tokens attend to a second token set: not self-attention, so not rerouted."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.memory = nn.Parameter(torch.randn(1, 4, 8))
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        memory = self.memory.expand(len(x), -1, -1)
        return self.attention(tokens, memory, memory, need_weights=False)[0]


def test_cross_attention_is_left_as_a_note_and_the_routed_class_refuses_it():
    the_plan = icrewrite.plan(CrossAttention())
    assert not the_plan.count("route-through-module")
    assert any(n.target == "attention.out_proj" and "used functionally" in n.reason for n in the_plan.notes)
    routed = icrewrite.convert(torchvision_vit()).encoder.layers[0].self_attention
    x, y = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    with pytest.raises(ConversionError, match="self-attention"):
        routed(x, y, y)


def test_no_reroute_when_its_layers_get_no_ic():
    model = MODELS["timm-eva02"][0]()
    the_plan = icrewrite.plan(model, exclude=["*.attn.qkv"])
    assert not the_plan.count("route-through-module")
    assert not icrewrite.convert(model, exclude=["*.attn.qkv"]).blocks[0].attn.qkv_bias_separate


@pytest.mark.parametrize("name", ["timm-eva02", "torchvision-vit", "torchvision-swin-v2"])
def test_converted_attention_traces_with_its_layers_as_module_calls(name):
    """torch.fx sees the rerouted layers as modules (and so their IC blocks)."""
    converted = icrewrite.convert(MODELS[name][0]())
    calls = {s.qualname(n.target) for s in trace_scopes(converted) if s.graph is not None
             for n in s.graph.nodes if n.op == "call_module"}
    rerouted = {n for n, m in converted.named_modules() if n.endswith(("attn.qkv", "attn.proj", "out_proj"))}
    assert rerouted and rerouted <= calls


def test_timm_checkpoint_round_trip(tmp_path):
    model = randomize_norms(MODELS["timm-eva02"][0]()).eval()
    converted = icrewrite.convert(model)
    # the builder's arguments, which timm < 1.0.31 does not record (icrewrite refuses to save without them there)
    loaded = load(save(converted, tmp_path / "eva.safetensors", model_args={"depth": 2, "img_size": 28}))
    assert loaded.blocks[0].attn.qkv_bias_separate
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), converted.eval()(x))


def test_torchvision_pickle_and_state_dict_round_trip():
    """Routed classes live at module level: the whole model pickles; a state dict fits a fresh conversion."""
    torch.manual_seed(0)
    converted = icrewrite.convert(torchvision_swin(v2=True)).eval()
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False).eval()
    rebuilt = icrewrite.convert(torchvision_swin(v2=True))
    rebuilt.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = converted(x)
        torch.testing.assert_close(unpickled(x), expected)
        torch.testing.assert_close(rebuilt.eval()(x), expected)
