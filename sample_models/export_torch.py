"""Export small PyTorch models to ONNX, with data and PyTorch's own Jacobians as references.

Needs torch==2.13.0 (the `bench` extra) and, for the torch.export-based exporter, onnxscript:

    pip install torch==2.13.0 onnxscript && python sample_models/export_torch.py [NAME ...]

Writes sample_models/torch/: NAME_opsetK.onnx for the legacy (TorchScript) exporter at opsets
13 and 17 and the torch.export exporter at opset 18 (old opsets, 7 to 13, for three more
networks, one of them exported with a fixed batch of one), NAME.npy (4 samples), and NAME_ref.npz with
torch.func's input Jacobian (N, *out, *in) and per-sample parameter Jacobian for the first
outputs (N, k, P, columns in state_dict order). The tests check jaccli against these and against
onnxruntime without PyTorch installed.
"""

from __future__ import annotations

import copy
import os
import sys

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_models import Encoder, ResNet, trained_looking_norms  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch")
N = 4
PARAM_OUTPUTS = 3  # output elements whose per-sample parameter Jacobian is stored


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


class PixelCNN(nn.Module):
    """PixelShuffle: at opsets 7 and 8 a Reshape whose shape the exporter casts from float constants."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.PixelShuffle(2),
                                 nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 7 * 7, 4))

    def forward(self, x):
        return self.net(x)


class UpBilinear(nn.Module):
    """Bilinear upsampling by 2: from opset 11 a Resize whose scales the exporter concatenates
    from float constants."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3), nn.Linear(3 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(nn.functional.interpolate(torch.tanh(self.conv(x)), scale_factor=2, mode="bilinear").flatten(1))


class ResizeTo(nn.Module):
    """F.interpolate to a size, exported with a fixed batch of one: at opset 9 an Upsample by the
    float32 scales 5/3 and 7/4, whose sizes onnxruntime (and torch) take in float32."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3 * 5 * 7, 3)

    def forward(self, x):
        return self.fc(nn.functional.interpolate(torch.tanh(self.conv(x)), size=(5, 7)).flatten(1))


DEFAULT_EXPORTS = (("script", 13), ("script", 17), ("dynamo", 18))
MODELS = {  # name: (network, sample shape, exports: (exporter, opset), "fixed" for a batch of one)
    "gelu_mlp": (GeluMLP, (16,), DEFAULT_EXPORTS),
    "resnet_bn": (ResNet, (3, 16, 16), DEFAULT_EXPORTS),
    "transformer": (Encoder, (6, 16), DEFAULT_EXPORTS),
    "pixel_cnn": (PixelCNN, (3, 8, 8), (("script", 7), ("script", 11))),
    "up_bilinear": (UpBilinear, (2, 6, 6), (("script", 11), ("script", 13))),
    "resize_to": (ResizeTo, (2, 3, 4), (("fixed", 9), ("fixed", 11))),
}


def references(model, x):
    """torch.func's input Jacobian and per-sample parameter Jacobian (first outputs), float64."""
    model = model.double()
    x = x.double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v for k, v in model.named_buffers()}

    def f(xi):
        return model(xi[None])[0]

    J_in = vmap(jacrev(f))(x)

    def g(p, xi):
        return functional_call(model, (p, buffers), (xi[None],))[0].reshape(-1)[:PARAM_OUTPUTS]

    per = vmap(jacrev(g), in_dims=(None, 0))(params, x)  # {name: (N, k, *shape)}
    G = torch.cat([per[k].reshape(len(x), PARAM_OUTPUTS, -1) for k in params], dim=-1)
    values = np.concatenate([p.detach().numpy().ravel() for p in params.values()])
    return J_in.detach().numpy(), G.detach().numpy(), list(params), [int(p.numel()) for p in params.values()], values


def export(model, x, how, opset, path):
    if how == "dynamo":
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                 dynamic_shapes=({0: torch.export.Dim("N", min=1)},), opset_version=opset)
        prog.save(path)
        return
    # the TorchScript exporter, no constant folding: it would fuse BatchNormalization into the convolutions
    batch = {} if how == "fixed" else {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}}
    torch.onnx.export(model, (x[:1] if how == "fixed" else x,), path, opset_version=opset, dynamo=False,
                      input_names=["x"], output_names=["y"], do_constant_folding=False, **batch)


def main(names=None):
    os.makedirs(HERE, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for name, (cls, shape, exports) in MODELS.items():  # each built, named or not: the same weights either way
        model = cls().eval()
        trained_looking_norms(model, g)
        x = torch.randn(N, *shape, generator=g)
        if names and name not in names:
            continue
        np.save(os.path.join(HERE, f"{name}.npy"), x.numpy())
        for how, opset in exports:
            export(model, x, how, opset, os.path.join(HERE, f"{name}_opset{opset}.onnx"))
        with torch.no_grad():
            y = model(x)
        J_in, G, pnames, sizes, values = references(copy.deepcopy(model), x)
        np.savez_compressed(os.path.join(HERE, f"{name}_ref.npz"), outputs=y.numpy(), input_jacobian=J_in,
                            param_jacobian=G, param_names=np.array(pnames), param_sizes=np.array(sizes),
                            param_values=values)
        print(f"{name}: wrote {', '.join(f'opset {k} ({h})' for h, k in exports)}, data and references")


if __name__ == "__main__":
    main(sys.argv[1:])
