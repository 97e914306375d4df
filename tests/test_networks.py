"""The 3D U-Net of Deep Image Prior: shapes (odd sizes included), argument checks, initialisation."""
import pytest
import torch

from qsmdip.networks import UNet3d


@pytest.mark.parametrize("shape", [(16, 16, 16), (33, 34, 35), (9, 12, 7)])
def test_output_has_the_input_size_for_any_shape(shape):
    net = UNet3d(in_channels=2, out_channels=3, width=4, depth=3)
    with torch.no_grad():
        y = net(torch.randn(1, 2, *shape))
    assert y.shape == (1, 3) + shape
    assert torch.isfinite(y).all()


def test_depth_zero_is_a_plain_convolutional_network():
    net = UNet3d(width=4, depth=0)
    assert len(net.down) == 0 and len(net.up) == 0
    with torch.no_grad():
        assert net(torch.randn(1, 1, 5, 6, 7)).shape == (1, 1, 5, 6, 7)


def test_channels_double_per_level_and_encoder_uses_stride_two():
    net = UNet3d(width=16, depth=3)
    convs = [level[0][0] for level in net.down]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert all(c.stride == (2, 2, 2) for c in convs)
    assert [block[0].out_channels for block in net.up] == [64, 32, 16]


def test_no_bias_before_instance_norm_and_bias_without_norm():
    with_norm = UNet3d(width=4, depth=2, norm="instance")
    convs = [m for m in with_norm.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(c.bias is None for c in convs[:-1])  # all but the 1x1 head
    assert convs[-1].bias is not None and convs[-1].kernel_size == (1, 1, 1)
    without = UNet3d(width=4, depth=2, norm="none")
    assert all(m.bias is not None for m in without.modules() if isinstance(m, torch.nn.Conv3d))
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in without.modules())


def test_xavier_normal_initialisation_has_the_expected_spread():
    net = UNet3d(width=16, depth=2)
    conv = net.merge[0][0]  # 64 -> 32 channels, 3x3x3
    fan_in, fan_out = conv.in_channels * 27, conv.out_channels * 27
    expected = (2.0 / (fan_in + fan_out)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)


def test_seeded_generator_gives_identical_weights():
    a, b = UNet3d(width=4, depth=2), UNet3d(width=4, depth=2)
    a.reset_parameters(torch.Generator().manual_seed(7))
    b.reset_parameters(torch.Generator().manual_seed(7))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_gradients_reach_every_parameter():
    net = UNet3d(width=4, depth=2)
    net(torch.randn(1, 1, 10, 11, 12)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("kwargs, message", [
    (dict(width=0), "width"),
    (dict(width=2.5), "width"),
    (dict(depth=-1), "depth"),
    (dict(in_channels=0), "in_channels"),
    (dict(out_channels=True), "out_channels"),
    (dict(norm="batch"), "norm"),
    (dict(negative_slope=-0.1), "negative_slope"),
    (dict(upsample="cubic"), "upsample"),
    (dict(pad_mode="wrap"), "pad_mode"),
    (dict(decoder="transposed"), "decoder"),
])
def test_bad_arguments_raise_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet3d(**kwargs)


def test_wrong_input_channels_is_refused():
    with pytest.raises(ValueError, match="expected input"):
        UNet3d(in_channels=2, width=4, depth=1)(torch.zeros(1, 1, 4, 4, 4))


def test_conv_first_decoder_has_the_same_weights_and_runs_its_blocks_on_the_coarse_grid():
    """"conv-first" halves the channels before upsampling: the same parameters, a different function, and
    each decoder block's convolution sees the coarse level's voxels (8x fewer), which is where it saves time."""
    original = UNet3d(width=4, depth=2)
    cheaper = UNet3d(width=4, depth=2, decoder="conv-first")
    cheaper.load_state_dict(original.state_dict())  # same parameter names and shapes
    x = torch.randn(1, 1, 12, 16, 8)
    seen = {}
    for name, net in (("original", original), ("cheaper", cheaper)):
        sizes = []
        hook = net.up[-1][0].register_forward_hook(lambda m, i, o: sizes.append(tuple(i[0].shape[-3:])))
        out = net(x)
        hook.remove()
        seen[name] = (out, sizes[0])
        assert out.shape == (1, 1, 12, 16, 8) and torch.isfinite(out).all()
    assert seen["original"][1] == (12, 16, 8)    # the last decoder block at full resolution
    assert seen["cheaper"][1] == (6, 8, 4)       # ... and on the level below
    assert not torch.allclose(seen["original"][0], seen["cheaper"][0])


@pytest.mark.parametrize("in_channels", [1, 2, 4])
def test_cpu_fast_paths_compute_the_plain_modules_function(in_channels, monkeypatch):
    """The zero-padded stem (oneDNN's fast 3-channel kernel) and the einsum head change the speed on the CPU,
    not the function: output and every weight gradient match the network run through its own modules."""
    import qsmdip.networks as networks

    torch.manual_seed(0)
    net = UNet3d(in_channels=in_channels, out_channels=1, width=4, depth=2, decoder="conv-first")
    torch.nn.init.normal_(net.head.bias)
    x = torch.randn(1, in_channels, 11, 13, 9)

    def output_and_grads():
        net.zero_grad()
        y = net(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), [p.grad.clone() for p in net.parameters()]

    fast = output_and_grads()
    monkeypatch.setattr(networks, "CPU_STEM_CHANNELS", None)
    monkeypatch.setattr(UNet3d, "_head", lambda self, y: self.head(y))
    plain = output_and_grads()
    assert torch.allclose(fast[0], plain[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fast[1], plain[1]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)
