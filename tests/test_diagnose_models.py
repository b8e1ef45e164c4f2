"""Specification of the traced model graph on real models (the models themselves: ``tests.helpers.models``)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_gradstab.diagnosis import trace
from tests.helpers.models import (  # noqa: F401  (re-exported for test files that import them from here)
    BasicBlock,
    DigitsClassifier,
    PreLNTransformer,
    ResidualMLP,
    SequenceClassifier,
    SmallResNet,
    digits,
    digits_batch,
    digits_loader,
    images,
    mlp,
    orthogonal_gru,
    sequences,
    tokens,
    training_error,
    vanilla_rnn,
)
from tests.helpers.trainers import quiet_trainer  # noqa: F401

torch.set_num_threads(1)

def _graph(model: nn.Module, inputs: Tensor):
    graph, _ = trace(model, lambda batch: model(batch), inputs=inputs)
    return graph


def test_sequential_mlp_graph_finds_each_layers_activation_and_the_full_plain_chain():
    graph = _graph(mlp(5, 16), digits_batch(8))
    hidden = [layer for layer in graph.layers if layer.name != "8"]
    assert [layer.activation for layer in hidden] == ["relu"] * 4
    assert graph.layer("8").is_output and graph.layer("8").activation is None
    assert graph.plain_depth == 5 and graph.skip_connections == 0
    assert not graph.plain_chain_normalized


def test_functional_activations_and_residual_adds_are_seen_in_forward():
    graph = _graph(ResidualMLP(), digits_batch(8))
    assert graph.layer("stem").activation == "relu"  # F.relu inside forward, not a module
    assert graph.skip_connections == 6
    assert graph.layer("blocks.0.3").feeds_join  # the last layer of each residual branch
    assert graph.layer("blocks.0.1").normalized is False and graph.plain_chain_normalized
    assert graph.plain_depth == 3  # stem + one branch: the skips cut the 14-layer path short


def test_batchnorm_between_layer_and_activation_marks_the_layer_normalized():
    graph = _graph(mlp(4, 16, batchnorm=True), digits_batch(8))
    assert graph.layer("0").normalized and graph.layer("0").activation == "relu"
    assert graph.normalization_layers == ["1", "4", "7"]


def test_pre_ln_transformer_graph_has_residual_stream_and_short_plain_chain():
    graph = _graph(PreLNTransformer(), tokens())
    embed = graph.layer("embed")
    assert embed.kind == "embedding" and embed.normalized and embed.feeds_join
    assert graph.layer("encoder.layers.0.linear1").activation == "relu"
    assert graph.layer("encoder.layers.0.self_attn").kind == "attention"
    assert graph.skip_connections == 8 and graph.plain_depth <= 4
    assert graph.untraced == []  # the positional parameter is used in an add


def test_resnet_block_graph_sees_conv_bn_relu_and_skips():
    graph = _graph(SmallResNet(), images())
    conv = graph.layer("blocks.0.conv1")
    assert conv.kind == "conv" and conv.normalized and conv.activation == "relu"
    assert graph.skip_connections == 4 and graph.plain_depth <= 4


@pytest.mark.parametrize("cell", [nn.RNN, nn.LSTM, nn.GRU])
def test_recurrent_layers_are_traced_with_their_sequence_shape(cell):
    graph = _graph(SequenceClassifier(cell), sequences(length=12))
    assert graph.layer("rnn").kind == "recurrent"
    assert graph.layer("rnn").input_shape == (8, 12, 8)
    assert graph.plain_depth == 2


def test_torchscript_model_cannot_be_hooked_and_the_graph_says_why():
    graph = _graph(torch.jit.script(mlp(3, 8)), digits_batch(4))
    assert graph.layers == [] and "ScriptModule" in graph.problems[0]


