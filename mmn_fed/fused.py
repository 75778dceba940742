"""The training step of the default MultiModN, differentiated by hand (issue 14: training throughput).

``mmn_fed.training.train_epochs`` takes this path for a MultiModN of MLP encoders on a static table: the loss
that ``training.model_loss`` computes (the states with a loss cell decoded, their cells averaged with the task
weights), its gradient with respect to every parameter written out (``FusedStep.gradients``: the chain rule
of the residual encoders and the MLP decoders), the clipping of the global gradient norm, and torch's fused
Adam kernel on the optimizer's own state. Autograd records each of a step's ~200 small operations on
256 x 32 tensors and replays them backwards, a few microseconds of dispatch each: most of a step. Here the
same arithmetic runs in about half the operations, with no graph: the weight gradients are written straight
into one flat buffer (one operation for the global norm, one to clip), a layer's dropout scale rides on the
matrix product that needs it, and Adam's step counts are one tensor.

What stays the same: the dropout masks are drawn in the autograd path's order and shapes (the encoders' at
once, then two per decoder call), so both paths consume the same random numbers; a module is updated by Adam
only when autograd would give it a gradient (an encoder that ran on some row of the batch, a decoder with a
loss cell, the initial state; every trainable parameter under FedProx), with the optimizer's per-parameter
state and step counts. Losses and gradients agree with autograd's to float rounding
(``tests/mmn_fed/test_fused.py``), not bit for bit: some sums run in another order. Anything else (GRU
encoders, P-Fusion, time series, ``state_change_penalty``, a shuffled encoder order, an optimizer other than
``training.make_optimizer``'s) keeps the autograd path.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .model import MLPEncoder, MultiModN, keep_masks_in_sequence, keep_scale
from .modules import module_of

_KINDS = ("binary", "multiclass", "regression")
_ZERO = torch.zeros(())  # the ignored input of addmm(beta=0): a scaled matrix product in one operation


def _mlp_layers(net: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """The three Linear layers of a network built by ``model.mlp`` (Linear, ReLU, Dropout, x2, Linear), else None."""
    kinds = (nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear)
    if not isinstance(net, nn.Sequential) or len(net) != len(kinds):
        return None
    if any(type(layer) is not k for layer, k in zip(net, kinds)):
        return None
    return net[0], net[3], net[6]


def supported(model: nn.Module, schema, optimizer: torch.optim.Optimizer | None = None,
              params: Sequence[tuple[str, nn.Parameter]] | None = None, *, state_change_penalty: float = 0.0,
              shuffle_order: bool = False) -> bool:
    """Whether ``FusedStep`` computes this model's training step as autograd would: MultiModN with ``model.mlp``
    encoders and decoders at the model's dropout, float32 on the CPU, no hooks, the loss without a state-change
    penalty, the schema's order; the trainable ``params`` (default: all) requiring gradients and exactly those of
    the optimizer, Adam as ``training.make_optimizer`` builds it (fused, one parameter group, scalar settings, no
    amsgrad / maximize / step hooks)."""
    if type(model) is not MultiModN or state_change_penalty or shuffle_order or not hasattr(torch, "_fused_adam_"):
        return False
    if any(type(e) is not MLPEncoder or _mlp_layers(e.net) is None for e in model.encoders.values()):
        return False
    if any(_mlp_layers(d) is None or {d[2].p, d[5].p} != {model.config.dropout} for d in model.decoders.values()):
        return False  # the decoders' own dropout is the model's (autograd's path reads each layer's)
    if any(schema.tasks[t].kind not in _KINDS for t in model.tasks):
        return False
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
        return False
    if _hooked(model):  # hooks expect the modules to be called, as autograd's path calls them
        return False
    trainable = [p for _, p in (params if params is not None else model.named_parameters())]
    if not all(p.requires_grad for p in trainable):  # a frozen parameter gets no gradient: autograd never steps it
        return False
    if optimizer is None:
        return True
    if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
        return False
    g = optimizer.param_groups[0]
    if {id(p) for p in g["params"]} != {id(p) for p in trainable}:  # autograd would step the optimizer's others too
        return False
    if not g.get("fused") or any(g.get(k) for k in ("amsgrad", "maximize", "differentiable", "decoupled_weight_decay")):
        return False
    if torch.is_tensor(g.get("lr")) or any(torch.is_tensor(b) for b in g.get("betas", ())):
        return False
    from torch.optim import optimizer as O

    return not (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or O._global_optimizer_pre_hooks or O._global_optimizer_post_hooks)


def _hooked(model: nn.Module) -> bool:
    """Whether a forward or backward hook is registered on ``model``, any of its modules, or globally."""
    from torch.nn.modules import module as M

    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(M, f"_global{n}", None) for n in names):
        return True
    return any(getattr(m, n, None) for m in model.modules() for n in names) or \
        any(getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)
            for p in model.parameters())


class _Layers:
    """One MLP's parameters (W1, b1, W2, b2, W3, b3), their transposes, and its gradient buffers."""

    def __init__(self, net: nn.Sequential, grads: Mapping[int, Tensor], state_size: int = 0):
        lins = _mlp_layers(net)
        self.W = [lin.weight for lin in lins]
        self.b = [lin.bias for lin in lins]
        self.Wt = [w.t() for w in self.W]
        self.gW = [grads[id(lin.weight)] for lin in lins]
        self.gb = [grads[id(lin.bias)] for lin in lins]
        self.W1_state = self.W[0][:, :state_size] if state_size else None  # an encoder's state columns


class FusedStep:
    """Forward, hand-written backward, clipping and Adam for one batch (see the module's docstring). Built
    once per ``train_epochs`` call for a model, its trainable parameters and optimizer."""

    def __init__(self, model: MultiModN, schema, params: Sequence[tuple[str, nn.Parameter]],
                 optimizer: torch.optim.Optimizer, grad_clip: float,
                 anchor: Mapping[str, Tensor] | None = None, prox_mu: float = 0.0):
        self.model, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.p = model.config.dropout
        self.hidden, self.size = model.config.hidden, model.config.state_size
        self.tasks = [(t, schema.tasks[t].kind, float(schema.tasks[t].weight)) for t in model.tasks]
        self.anchor, self.prox_mu = (anchor, prox_mu) if prox_mu > 0 else (None, 0.0)
        self.param = dict(model.named_parameters())
        # every gradient is a view of one flat buffer: one operation each for the global norm and the clipping
        self.flat = torch.zeros(sum(p.numel() for p in self.param.values()))
        self.grad, offset = {}, 0
        for n, p in self.param.items():
            self.grad[n] = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        by_id = {id(p): self.grad[n] for n, p in self.param.items()}
        self.enc = {m: _Layers(e.net, by_id, self.size) for m, e in model.encoders.items()}
        self.dec = {t: _Layers(d, by_id) for t, d in model.decoders.items()}
        # the trainable parameters by module (Adam updates a module's when it has a gradient this step), and
        # their step counts as one tensor whose elements are the optimizer state's "step"
        trainable = {n for n, _ in params}
        self.module_params: dict[str, list[str]] = {}
        for n in self.param:
            if n in trainable:
                self.module_params.setdefault(module_of(n), []).append(n)
        self.slot = {n: j for j, n in enumerate(n for names in self.module_params.values() for n in names)}
        self.steps = torch.zeros(len(self.slot))
        self._groups: dict[tuple[str, ...], tuple] = {}

    # ---- one step ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch) -> tuple[float, int]:
        """Train on ``batch`` (a ``TensorData``): returns (loss, cells) as ``model_loss`` + ``optimizer_step``
        would; no update when the batch has no loss cell."""
        loss, cells, modules = self.gradients(batch)
        if not cells:
            return loss, 0
        return loss + self._update(modules), cells

    @torch.no_grad()
    def gradients(self, batch) -> tuple[float, int, tuple[str, ...]]:
        """(loss, cells, modules): ``model_loss`` on ``batch``, and its gradient with respect to every parameter
        in ``self.grad``; ``modules``: the trainable modules autograd would give a gradient (the other buffers
        hold stale values)."""
        model, B, D = self.model, len(batch), self.size
        order = model.modalities
        present = torch.stack([batch.present[m] for m in order])  # (E, B)
        held = present.sum(1).tolist()
        weights = present.unsqueeze(2).to(torch.float32)  # where(present, a, b) = b + (a - b) * weights
        applied = torch.cat([torch.ones(1, B, dtype=torch.bool), present])  # (S, B)
        S = applied.shape[0]
        labelled = [batch.y_present[t] for t, _, _ in self.tasks]
        cells = (applied.unsqueeze(0) & torch.stack(labelled).unsqueeze(1)).sum((1, 2)).tolist()
        training = model.training and self.p > 0
        run = [m for m, k in zip(order, held) if k]
        H, drop, dec_masks = self.hidden, None, {}
        if not sum(cells):  # no update; autograd's path still ran the encoders, and drew their masks
            if training and run:
                keep_masks_in_sequence([2 * len(run) * B * H], self.p)
            return float("nan"), 0, ()
        scale = keep_scale(self.p) if training else 1.0  # a kept unit's dropout factor
        if training:  # every dropout mask of the step, drawn as the autograd path draws them, at once
            sizes = ([2 * len(run) * B * H] if run else []) + [n * H for n in cells if n for _ in (1, 2)]
            parts = keep_masks_in_sequence(sizes, self.p)
            if run:
                drop = iter(parts.pop(0).view(len(run), 2, B, H))
            for (t, _, _), n in zip(self.tasks, cells):
                if n:
                    dec_masks[t] = (parts.pop(0).view(n, H), parts.pop(0).view(n, H))

        # forward: the states, as MultiModN.encode_states
        states = torch.empty(S, B, D)
        states[0] = model.init_state
        saved = []
        for i, (m, k) in enumerate(zip(order, held)):
            s, out = states[i], states[i + 1]
            if not k:
                out.copy_(s)
                saved.append(None)
                continue
            L, M = self.enc[m], next(drop) if drop is not None else None
            z = torch.cat([s, batch.x[m]], dim=1)
            h1, h2 = _hidden_forward(L, z, M)
            if k == B:
                torch.addmm(L.b[2], h2, L.Wt[2], out=out).add_(s)
            else:  # the rows without the modality keep their state
                torch.addcmul(s, torch.addmm(L.b[2], h2, L.Wt[2]), weights[i], out=out)
            saved.append((z, h1, h2, weights[i] if k < B else None))
        flat = states.view(-1, D)

        # the decoders on the states with a loss cell: the loss, and its gradient at every state
        weight = max(sum(w * n for (_, _, w), n in zip(self.tasks, cells)), 1.0)
        loss, g_states = 0.0, None
        for (t, kind, w), yp, n in zip(self.tasks, labelled, cells):
            if not n:
                continue
            if n == S * B:
                rows, keep, y = flat, None, batch.y[t].repeat(S)
            else:  # the rows of (state, row) cells, state-major as in ``flat``
                keep = (applied & yp.unsqueeze(0)).view(-1).nonzero().squeeze(1)
                rows, y = flat.index_select(0, keep), batch.y[t].index_select(0, keep.remainder(B))
            value, g_rows = self._decoder(self.dec[t], kind, rows, y, dec_masks.get(t), scale, w / weight)
            loss += w * value
            if keep is None:
                g_states = g_rows if g_states is None else g_states.add_(g_rows)
            else:
                g_states = torch.zeros_like(flat) if g_states is None else g_states
                g_states.index_add_(0, keep, g_rows)

        # backward through the encoders, last to first: T is the gradient at the state after encoder i
        g_states = g_states.view(S, B, D)
        T = g_states[S - 1]
        for i in range(S - 2, -1, -1):
            if saved[i] is None:  # no encoder ran: state i + 1 is state i
                T = g_states[i].add_(T)
                continue
            z, h1, h2, w_rows = saved[i]
            L = self.enc[order[i]]
            gu = T if w_rows is None else T * w_rows  # no gradient into the encoder from the rows it skipped
            g = _layer_backward(gu, h2, L, 2, scale)
            g = _layer_backward(g, h1, L, 1, scale)
            torch.mm(g.t(), z, out=L.gW[0])
            torch.sum(g, 0, out=L.gb[0])
            T = g_states[i].add_(T).addmm_(g, L.W1_state)  # in place: g_states is this step's own buffer
        torch.sum(T, 0, out=self.grad["init_state"])

        modules = ["init_state", *(f"encoders.{m}" for m in run),
                   *(f"decoders.{t}" for (t, _, _), n in zip(self.tasks, cells) if n)]
        return loss / weight, int(sum(cells)), tuple(mod for mod in modules if mod in self.module_params)

    @staticmethod
    def _decoder(L: _Layers, kind: str, rows: Tensor, y: Tensor, masks: tuple[Tensor, Tensor] | None,
                 scale: float, factor: float) -> tuple[float, Tensor]:
        """(summed loss of one task's cells at ``rows``, the gradient of ``factor`` x that sum at ``rows``); the
        decoder's weight gradients go to its buffers. ``masks``: its two layers' dropout (None: no dropout)."""
        h1, h2 = _hidden_forward(L, rows, masks)
        out = torch.addmm(L.b[2], h2, L.Wt[2])
        if kind == "binary":
            o = out.squeeze(1)
            value = F.binary_cross_entropy_with_logits(o, y, reduction="sum")
            g = torch.sigmoid(o).sub_(y).mul_(factor).unsqueeze(1)
        elif kind == "multiclass":
            value = F.cross_entropy(out, y, reduction="sum")
            g = torch.softmax(out, 1).sub_(F.one_hot(y, out.shape[1])).mul_(factor)
        else:
            o = out.squeeze(1)
            value = F.mse_loss(o, y, reduction="sum")
            g = (o - y).mul_(2.0 * factor).unsqueeze(1)
        g = _layer_backward(g, h2, L, 2, scale)
        g = _layer_backward(g, h1, L, 1, scale)
        torch.mm(g.t(), rows, out=L.gW[0])
        torch.sum(g, 0, out=L.gb[0])
        return float(value), torch.mm(g, L.W[0])

    # ---- FedProx, clipping, Adam --------------------------------------------------------------------------
    def _update(self, modules: tuple[str, ...]) -> float:
        """Clip the gradients of ``modules``' trainable parameters and take Adam's step on them (torch's fused
        kernel, on the optimizer's own state). Returns the FedProx term of the loss (0 without)."""
        prox = 0.0
        if self.anchor is not None:
            # (mu / 2) ||w - w_global||^2 reaches every trainable parameter: all of them have a gradient, as
            # with autograd (the modules this batch did not reach: the term's alone)
            idle = [self.grad[n] for mod, names in self.module_params.items() if mod not in modules for n in names]
            if idle:
                torch._foreach_zero_(idle)
            modules = tuple(self.module_params)
        params, grads, exp_avgs, exp_avg_sqs, steps, slots = self._group(modules)
        if self.anchor is not None:
            diffs = torch._foreach_sub(params, [self.anchor[n] for mod in modules for n in self.module_params[mod]])
            prox = 0.5 * self.prox_mu * sum(float(d.mul(d).sum()) for d in diffs)
            torch._foreach_add_(grads, diffs, alpha=self.prox_mu)
        if self.grad_clip > 0:
            if len(grads) == len(self.grad):  # every parameter: the flat buffer at once
                norm = float(torch.linalg.vector_norm(self.flat))
                if norm + 1e-6 > self.grad_clip:
                    self.flat.mul_(self.grad_clip / (norm + 1e-6))
            else:
                clip_grads(grads, self.grad_clip)
        if slots is None:
            self.steps.add_(1.0)
        else:
            self.steps.index_add_(0, slots, torch.ones(len(slots)))
        g = self.optimizer.param_groups[0]
        beta1, beta2 = g["betas"]
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=g["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
                           grad_scale=None, found_inf=None)
        return prox

    def _group(self, modules: tuple[str, ...]) -> tuple:
        """(params, grads, exp_avgs, exp_avg_sqs, steps, slots) of ``modules``' trainable parameters, cached per set
        of modules. Adam's state is created as ``torch.optim.Adam`` creates it at a parameter's first gradient;
        its "step" becomes a view of ``self.steps`` (``slots``: the elements to count, None = all of them)."""
        if modules not in self._groups:
            names = [n for mod in modules for n in self.module_params[mod]]
            known = {id(p) for p in self.optimizer.param_groups[0]["params"]}
            lists: tuple[list, ...] = ([], [], [], [], [])
            for n in names:
                p = self.param[n]
                if id(p) not in known:
                    raise ValueError(f"parameter {n} is trainable but not in the optimizer")
                st, j = self.optimizer.state[p], self.slot[n]
                if not st:
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.steps[j] = 0.0
                else:
                    self.steps[j] = float(st["step"])
                st["step"] = self.steps[j]  # a 0-d view: counted with all the others in one operation
                for lst, v in zip(lists, (p, self.grad[n], st["exp_avg"], st["exp_avg_sq"], st["step"])):
                    lst.append(v)
            slots = None if len(names) == len(self.slot) else torch.tensor([self.slot[n] for n in names])
            self._groups[modules] = (*lists, slots)
        return self._groups[modules]


def _hidden_forward(L: _Layers, x: Tensor, masks) -> tuple[Tensor, Tensor]:
    """The two hidden layers of an MLP on ``x``: ``relu(x W1^T + b1) * masks[0]`` and the same for layer 2 (no
    dropout when ``masks`` is None)."""
    h1 = torch.addmm(L.b[0], x, L.Wt[0]).relu_()
    if masks is not None:
        h1.mul_(masks[0])
    h2 = torch.addmm(L.b[1], h1, L.Wt[1]).relu_()
    if masks is not None:
        h2.mul_(masks[1])
    return h1, h2


def _layer_backward(g: Tensor, inp: Tensor, L: _Layers, k: int, scale: float) -> Tensor:
    """Linear layer ``k`` of an MLP (2: the output layer, 1: the middle one) backwards: ``g`` is the gradient at
    its output, ``inp`` its input, ``relu(a) * mask`` of the layer before. Writes the layer's weight and bias
    gradients; returns the gradient at ``a``: ``scale * (g @ W)`` where the unit was active and kept
    (``inp > 0``; a kept unit's dropout factor is ``scale``), else 0."""
    torch.mm(g.t(), inp, out=L.gW[k])
    torch.sum(g, 0, out=L.gb[k])
    g_inp = torch.addmm(_ZERO, g, L.W[k], beta=0.0, alpha=scale) if scale != 1.0 else torch.mm(g, L.W[k])
    return torch.ops.aten.threshold_backward(g_inp, inp, 0.0)


def clip_grads(grads: list[Tensor], max_norm: float) -> Tensor:
    """Scale ``grads`` in place so that their global L2 norm is at most ``max_norm``: the arithmetic of
    ``torch.nn.utils.clip_grad_norm_`` (L2, foreach) on one device, shared by both training paths
    (``training.clip_grad_norm``). Returns the norm before clipping."""
    if not grads:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
    torch._foreach_mul_(grads, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total
