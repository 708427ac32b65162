"""Small PyTorch implementations of the spec's formulas where `transformers` has no counterpart.

Written from the formulas in the spec (gate renormalisation, the expert- and device-level balance losses), as an
independent reference for the JAX code: plain loops and explicit counts, no shared code with the library.
"""

import torch
import torch.nn.functional as F


def spec_gate(x, gate_weight, k, norm_topk_prob):
    """x [N, H], gate_weight [E, H] -> scores [N, E], weights [N, k], indices [N, k]."""
    scores = torch.softmax(x.float() @ gate_weight.float().T, dim=-1)
    weights, indices = torch.topk(scores, k, dim=-1)
    if k > 1 and norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return scores, weights, indices


def spec_expert_loss(scores, indices, alpha, seq_aux):
    """scores [B, T, E], indices [B, T, K]."""
    b, t, n = scores.shape
    k = indices.shape[-1]
    if seq_aux:
        total = 0.0
        for i in range(b):
            counts = torch.zeros(n)
            for e in indices[i].reshape(-1).tolist():
                counts[e] += 1
            ce = counts / (t * k / n)
            total = total + (ce * scores[i].mean(0)).sum()
        return alpha * total / b
    counts = torch.zeros(n)
    for e in indices.reshape(-1).tolist():
        counts[e] += 1
    f = n * counts / (b * t * k)
    p = scores.reshape(-1, n).mean(0)
    return alpha * (p * f).sum()


def spec_device_loss(scores, indices, alpha, groups):
    b, t, n = scores.shape
    k = indices.shape[-1]
    counts = torch.zeros(n)
    for e in indices.reshape(-1).tolist():
        counts[e] += 1
    f = n * counts / (b * t * k)
    p = scores.reshape(-1, n).mean(0)
    per = n // groups
    total = 0.0
    for d in range(groups):
        total = total + f[d * per : (d + 1) * per].mean() * p[d * per : (d + 1) * per].sum()
    return alpha * total


def swiglu(x, gate, up, down):
    """Torch Linear layout: gate/up [I, H], down [H, I]."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


class SpecMoE(torch.nn.Module):
    """The DeepSeekMoE block per the spec, evaluated token by token (dropless), with optional renormalisation."""

    def __init__(self, hidden, n_experts, k, width, n_shared, norm_topk_prob):
        super().__init__()
        self.k, self.norm_topk_prob = k, norm_topk_prob
        self.gate_weight = torch.nn.Parameter(torch.zeros(n_experts, hidden))
        self.w_gate = torch.nn.Parameter(torch.zeros(n_experts, width, hidden))
        self.w_up = torch.nn.Parameter(torch.zeros(n_experts, width, hidden))
        self.w_down = torch.nn.Parameter(torch.zeros(n_experts, hidden, width))
        self.shared = None
        if n_shared:
            self.shared = torch.nn.ParameterList(
                [
                    torch.nn.Parameter(torch.zeros(width * n_shared, hidden)),
                    torch.nn.Parameter(torch.zeros(width * n_shared, hidden)),
                    torch.nn.Parameter(torch.zeros(hidden, width * n_shared)),
                ]
            )
        self.last_routing = None

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, weights, indices = spec_gate(flat, self.gate_weight, self.k, self.norm_topk_prob)
        self.last_routing = (scores.reshape(*shape[:-1], -1), indices.reshape(*shape[:-1], -1))
        rows = []
        for n in range(flat.shape[0]):
            y = torch.zeros(shape[-1], dtype=flat.dtype)
            for j in range(self.k):
                e = int(indices[n, j])
                y = y + weights[n, j] * swiglu(flat[n], self.w_gate[e], self.w_up[e], self.w_down[e])
            rows.append(y)
        out = torch.stack(rows).reshape(shape)
        if self.shared is not None:
            out = out + swiglu(x, *self.shared)
        return out

    def v1_state_dict(self, prefix):
        """Weights under v1 checkpoint keys (``prefix`` = ``model.layers.{i}.mlp.``)."""
        sd = {prefix + "gate.weight": self.gate_weight.detach().clone()}
        for e in range(self.w_gate.shape[0]):
            sd[f"{prefix}experts.{e}.gate_proj.weight"] = self.w_gate[e].detach().clone()
            sd[f"{prefix}experts.{e}.up_proj.weight"] = self.w_up[e].detach().clone()
            sd[f"{prefix}experts.{e}.down_proj.weight"] = self.w_down[e].detach().clone()
        if self.shared is not None:
            for name, p in zip(("gate_proj", "up_proj", "down_proj"), self.shared, strict=True):
                sd[f"{prefix}shared_experts.{name}.weight"] = p.detach().clone()
        return sd
