"""Export small PyTorch models to ONNX, with data and PyTorch's own Jacobians as references.

Needs torch==2.13.0 (the `bench` extra) and, for the torch.export-based exporter, onnxscript:

    pip install torch==2.13.0 onnxscript && python sample_models/export_torch.py

Writes sample_models/torch/: NAME_opsetK.onnx for the legacy (TorchScript) exporter at opsets
13 and 17 and the torch.export exporter at opset 18, NAME.npy (4 samples), and NAME_ref.npz with
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


MODELS = {
    "gelu_mlp": (GeluMLP, (16,)),
    "resnet_bn": (ResNet, (3, 16, 16)),
    "transformer": (Encoder, (6, 16)),
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


def main():
    os.makedirs(HERE, exist_ok=True)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    for name, (cls, shape) in MODELS.items():
        model = cls().eval()
        trained_looking_norms(model, g)
        x = torch.randn(N, *shape, generator=g)
        np.save(os.path.join(HERE, f"{name}.npy"), x.numpy())
        for opset in (13, 17):
            # no constant folding: it would fuse BatchNormalization into the convolutions
            torch.onnx.export(model, (x,), os.path.join(HERE, f"{name}_opset{opset}.onnx"), opset_version=opset,
                              dynamo=False, input_names=["x"], output_names=["y"], do_constant_folding=False,
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
        prog = torch.onnx.export(model, (x,), dynamo=True, input_names=["x"], output_names=["y"],
                                 dynamic_shapes=({0: torch.export.Dim("N", min=1)},), opset_version=18)
        prog.save(os.path.join(HERE, f"{name}_opset18.onnx"))
        with torch.no_grad():
            y = model(x)
        J_in, G, names, sizes, values = references(copy.deepcopy(model), x)
        np.savez_compressed(os.path.join(HERE, f"{name}_ref.npz"), outputs=y.numpy(), input_jacobian=J_in,
                            param_jacobian=G, param_names=np.array(names), param_sizes=np.array(sizes),
                            param_values=values)
        print(f"{name}: wrote opsets 13, 17 (TorchScript exporter) and 18 (torch.export), data and references")


if __name__ == "__main__":
    main()
