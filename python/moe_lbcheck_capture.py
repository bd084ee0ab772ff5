"""Record one training step of an MoE job as a moe-lbcheck capture; check it with `moe-lbcheck verify DIR`.

    import moe_lbcheck_capture as lbc
    cap = lbc.Capture("cap/", rank=rank, world_size=world, seq_len=S,
                      mesh=dict(dp=dp_rank, dp_size=dp, cp=cp_rank, cp_size=cp, microbatches=M),
                      objective=dict(aux_type="micro_batch", coeff=1e-2, top_k=2, score="softmax"),
                      framework="my-trainer 0.3")
    for l, layer in enumerate(model.layers):
        cap.attach(l, layer.router.gate)        # the module computing the router logits: input detached
    for m, (tokens, labels) in enumerate(microbatches):                  # tokens: [B, S]
        seqs = lbc.sequence_indices(dp_rank, m, micro_batch_size=B, microbatches=M)
        sequence, position, valid = lbc.token_ids(seqs, range(S), valid=tokens != PAD, layout="bs")
        with cap.microbatch(m, sequence=sequence, position=position, valid=valid), no_sync_unless_last(m):
            loss = model(tokens, labels)
            (loss * cap.main_loss_scale).backward()                       # the main loss x 0
    cap.save()                     # after the gradient sync, before optimizer.step(); removes the hooks
    optimizer.step()

Capture format v1: CAPTURE_DIR/rank{R}.safetensors per rank, manifest in __metadata__["moe_lbcheck_capture"].
Needs only torch (>= 1.13); copy this file into your job, or `pip install ./python` from the moe-lbcheck tree.
"""

import contextlib
import ctypes
import json
import numbers
import os
import re
import struct
import sys

import torch

__version__ = "0.1.0"
SCHEMA_VERSION = 1
METADATA_KEY = "moe_lbcheck_capture"

__all__ = ["Capture", "CaptureError", "token_ids", "cp_positions", "sp_positions", "sequence_indices",
           "SCHEMA_VERSION", "METADATA_KEY"]


class CaptureError(ValueError):
    """A capture that would break the contract, raised at the call that caused it."""


def _fail(msg):
    raise CaptureError("moe_lbcheck_capture: " + msg)


# Manifest vocabulary (capture format v1). The mesh coordinates default to 0 and the sizes to 1.
_MESH_DIMS = ("dp", "cp", "pp", "tp", "ep")
_OBJECTIVE_CHOICES = {
    "aux_type": ("micro_batch", "sequence", "global_batch"),
    "z_loss_scope": ("micro_batch", "global_batch"),
    "score": ("softmax", "sigmoid"),
    "group_weighting": ("uniform", "tokens"),
    "compute_dtype": ("float64", "float32", "bfloat16"),
}
_OBJECTIVE_REQUIRED = ("aux_type", "coeff", "top_k", "score")
_OBJECTIVE_DEFAULTS = {"z_loss_coeff": 0.0, "z_loss_scope": "micro_batch", "norm_topk_prob": False,
                       "exclude_padding": True, "group_weighting": "uniform"}
_OBJECTIVE_KEYS = _OBJECTIVE_REQUIRED + tuple(_OBJECTIVE_DEFAULTS) + ("compute_dtype",)

_FLOAT_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_INT_DTYPES = {torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_mesh(mesh, world_size):
    if not isinstance(mesh, dict):
        _fail("mesh must be a dict such as dict(dp=0, dp_size=2, microbatches=4), got %r" % (mesh,))
    allowed = [d for dim in _MESH_DIMS for d in (dim, dim + "_size")] + ["microbatches"]
    for key in mesh:
        if key not in allowed:
            _fail("mesh: unknown key %r (expected %s)" % (key, ", ".join(allowed)))
    out = {}
    for dim in _MESH_DIMS:
        size, coord = mesh.get(dim + "_size", 1), mesh.get(dim, 0)
        if not _is_int(size) or size < 1:
            _fail("mesh.%s_size must be an integer >= 1, got %r" % (dim, size))
        if not _is_int(coord) or not 0 <= coord < size:
            _fail("mesh.%s must be an integer in [0, %s_size=%d), got %r" % (dim, dim, size, coord))
        out[dim], out[dim + "_size"] = int(coord), int(size)
    m = mesh.get("microbatches", 1)
    if not _is_int(m) or m < 1:
        _fail("mesh.microbatches must be an integer >= 1, got %r" % (m,))
    out["microbatches"] = int(m)
    # Expert parallelism is carved out of the other dimensions (Megatron-LM, torchtitan).
    product = out["tp_size"] * out["cp_size"] * out["dp_size"] * out["pp_size"]
    if product != world_size:
        _fail("mesh: tp_size*cp_size*dp_size*pp_size = %d*%d*%d*%d = %d, but world_size = %d"
              % (out["tp_size"], out["cp_size"], out["dp_size"], out["pp_size"], product, world_size))
    return out


def _check_objective(objective):
    if not isinstance(objective, dict):
        _fail("objective must be a dict such as dict(aux_type='micro_batch', coeff=1e-2, top_k=2, "
              "score='softmax'), got %r" % (objective,))
    for key in objective:
        if key not in _OBJECTIVE_KEYS:
            _fail("objective: unknown key %r (expected one of %s)" % (key, ", ".join(_OBJECTIVE_KEYS)))
    for key in _OBJECTIVE_REQUIRED:
        if key not in objective:
            _fail("objective.%s is required" % key)
    out = dict(_OBJECTIVE_DEFAULTS)
    out.update(objective)
    for key, choices in _OBJECTIVE_CHOICES.items():
        if key in out and out[key] not in choices:
            _fail("objective.%s must be one of %s, got %r" % (key, ", ".join(choices), out[key]))
    for key in ("coeff", "z_loss_coeff"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            _fail("objective.%s must be a finite number >= 0, got %r" % (key, v))
        out[key] = float(v)
    if not _is_int(out["top_k"]) or out["top_k"] < 1:
        _fail("objective.top_k must be an integer >= 1, got %r" % (out["top_k"],))
    out["top_k"] = int(out["top_k"])
    for key in ("norm_topk_prob", "exclude_padding"):
        if not isinstance(out[key], bool):
            _fail("objective.%s must be true or false, got %r" % (key, out[key]))
    return {k: out[k] for k in _OBJECTIVE_KEYS if k in out}


def _as_index_vector(value, what):
    """A 1-D int64 CPU tensor from a tensor, range or sequence of ints."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype.is_floating_point or t.is_complex():
            _fail("%s must hold integers, got dtype %s" % (what, t.dtype))
        t = t.to("cpu").reshape(-1).to(torch.int64)
    else:
        try:
            t = torch.tensor(list(value), dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            _fail("%s must be a tensor or a sequence of integers, got %r" % (what, type(value).__name__))
    return t


def _as_valid_vector(value, n, what):
    if value is None:
        return torch.ones(n, dtype=torch.bool)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").reshape(-1)
        if t.dtype != torch.bool:
            if t.dtype.is_floating_point or not bool(((t == 0) | (t == 1)).all()):
                _fail("%s must be bool or 0/1 integers (1 = a real token, 0 = padding)" % what)
            t = t != 0
    else:
        t = _as_index_vector(value, what)
        if not bool(((t == 0) | (t == 1)).all()):
            _fail("%s must be bool or 0/1 integers (1 = a real token, 0 = padding)" % what)
        t = t != 0
    return t


def _grad_of(param):
    """The gradient as the optimizer will see it: Megatron-LM keeps it in param.main_grad."""
    g = getattr(param, "main_grad", None)
    if g is None:
        g = param.grad
    return g


def _full(t):
    # A sharded tensor (torch.distributed DTensor, FSDP2) is gathered first.
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _bytes_of(t):
    t = t.detach().to("cpu").contiguous()
    n = t.numel() * t.element_size()
    return ctypes.string_at(t.data_ptr(), n) if n else b""


class _Layer(object):
    def __init__(self, index, module, weight, expert_bias):
        self.index = index
        self.module = module
        self.weight = weight
        self.expert_bias = expert_bias
        self.experts, self.hidden = int(weight.shape[0]), int(weight.shape[1])
        self.weight_at_forward = None  # CPU copy taken at the first recorded forward
        self.grad_hook_calls = 0       # backward passes that reached the weight since the capture began
        self.inputs = {}               # microbatch -> [n, H] CPU tensor
        self.topk = {}                 # microbatch -> [n, k] int64 CPU tensor
        self.handles = []


class _Microbatch(object):
    def __init__(self, index, sequence, position, valid):
        self.index = index
        self.sequence, self.position, self.valid = sequence, position, valid
        self.rows = int(sequence.numel())


class Capture(object):
    """One rank's record of one training step.

    rank, world_size: this process in the job. seq_len: the sequence length of the global batch (every
    position is in [0, seq_len)). mesh: this rank's coordinates and the sizes, keys dp, dp_size, cp,
    cp_size, pp, pp_size, tp, tp_size, ep, ep_size, microbatches (coordinates default to 0, sizes to 1);
    dp is the data-parallel index of the data this rank holds. objective: the objective the job intends,
    keys aux_type (micro_batch | sequence | global_batch), coeff, top_k, score (softmax | sigmoid) and
    optional z_loss_coeff, z_loss_scope, norm_topk_prob, exclude_padding, group_weighting
    (uniform | tokens), compute_dtype (float64 | float32 | bfloat16; default: the gradient's dtype).
    main_loss_scale: what the job multiplies its main loss by; save() refuses anything but 0.
    """

    def __init__(self, directory, rank, world_size, mesh, seq_len, objective, framework="",
                 main_loss_scale=0.0):
        if not _is_int(world_size) or world_size < 1:
            _fail("world_size must be an integer >= 1, got %r" % (world_size,))
        if not _is_int(rank) or not 0 <= rank < world_size:
            _fail("rank must be an integer in [0, world_size=%d), got %r" % (world_size, rank))
        if not _is_int(seq_len) or seq_len < 1:
            _fail("seq_len must be an integer >= 1, got %r" % (seq_len,))
        if isinstance(main_loss_scale, bool) or not isinstance(main_loss_scale, (int, float)):
            _fail("main_loss_scale must be a number (0 for a capture), got %r" % (main_loss_scale,))
        self.directory = os.fspath(directory)
        self.rank, self.world_size, self.seq_len = int(rank), int(world_size), int(seq_len)
        self.mesh = _check_mesh(mesh, world_size)
        self.objective = _check_objective(objective)
        self.framework = str(framework)
        self._main_loss_scale = float(main_loss_scale)
        self._layers = {}
        self._active = None
        self._done = {}     # microbatch index -> _Microbatch, in the order they ran
        self._saved = None

    # -- what the training step calls -------------------------------------------------------------------

    @property
    def main_loss_scale(self):
        """Multiply the main loss by this before backward (0: the gradient is the aux part alone)."""
        return self._main_loss_scale

    def attach(self, layer_index, module, weight=None, expert_bias=None):
        """Register a forward pre-hook on `module`, the module that computes layer `layer_index`'s router
        logits (the gate nn.Linear, or the router module): inside cap.microbatch() it records the input
        rows and hands the module input.detach(), so no later layer's gradient reaches this router.
        weight: the router weight [E, H] as nn.Linear stores it (default module.weight).
        expert_bias: the optional [E] bias added to the scores for top-k selection only."""
        if self._saved is not None:
            _fail("attach(%r) after save()" % (layer_index,))
        if not _is_int(layer_index) or layer_index < 0:
            _fail("attach: layer_index must be an integer >= 0, got %r" % (layer_index,))
        if layer_index in self._layers:
            _fail("attach: layer %d is already attached" % layer_index)
        if not isinstance(module, torch.nn.Module):
            _fail("attach(%d): module must be a torch.nn.Module, got %s" % (layer_index, type(module).__name__))
        owner = getattr(module, "_moe_lbcheck_capture", None)
        if owner is not None and owner is not self:
            _fail("attach(%d): this module is attached to another Capture that was neither saved nor "
                  "closed (call remove_hooks() on it first)" % layer_index)
        if weight is None:
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor):
                _fail("attach(%d): %s has no .weight; pass weight= (the [E, H] router weight)"
                      % (layer_index, type(module).__name__))
        name = "layer%d.weight" % layer_index
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            _fail("attach(%d): %s must be a 2-D tensor [E, H], got shape %s"
                  % (layer_index, name, list(getattr(weight, "shape", []))))
        if weight.dtype not in _FLOAT_DTYPES:
            _fail("attach(%d): %s has dtype %s (expected float64, float32, bfloat16 or float16)"
                  % (layer_index, name, weight.dtype))
        if not weight.requires_grad:
            _fail("attach(%d): %s does not require grad, so it can get no gradient" % (layer_index, name))
        if self.objective["top_k"] > weight.shape[0]:
            _fail("attach(%d): objective.top_k = %d but %s has only %d experts"
                  % (layer_index, self.objective["top_k"], name, weight.shape[0]))
        if expert_bias is not None:
            if not isinstance(expert_bias, torch.Tensor) or list(expert_bias.shape) != [weight.shape[0]] \
                    or expert_bias.dtype not in _FLOAT_DTYPES:
                _fail("attach(%d): layer%d.expert_bias must be a float tensor of shape [%d], got %s" % (
                    layer_index, layer_index, weight.shape[0], list(getattr(expert_bias, "shape", []))))
        layer_index = int(layer_index)
        layer = _Layer(layer_index, module, weight, expert_bias)

        def pre_hook(mod, args):
            return self._on_router_input(layer, args)

        def grad_hook(grad):
            layer.grad_hook_calls += 1
            return None

        module._moe_lbcheck_capture = self
        layer.handles.append(module.register_forward_pre_hook(pre_hook))
        layer.handles.append(weight.register_hook(grad_hook))
        self._layers[layer_index] = layer
        return self

    @contextlib.contextmanager
    def microbatch(self, index, sequence, position, valid=None):
        """Wrap the forward (and backward) of microbatch `index` (0 <= index < mesh microbatches). sequence,
        position, valid: one entry per router input row as the router sees it, flattened in the same order
        (see token_ids()): the row's sequence index in the global batch, its position in [0, seq_len), and
        1 for a real token, 0 for padding (default: all real)."""
        if self._saved is not None:
            _fail("microbatch(%r) after save()" % (index,))
        if self._active is not None:
            _fail("microbatch(%r) entered while microbatch %d is still active" % (index, self._active.index))
        mbs = self.mesh["microbatches"]
        if not _is_int(index) or not 0 <= index < mbs:
            _fail("microbatch index must be an integer in [0, microbatches=%d), got %r" % (mbs, index))
        if index in self._done:
            _fail("microbatch %d was already recorded" % index)
        seq = _as_index_vector(sequence, "microbatch(%d): sequence" % index)
        pos = _as_index_vector(position, "microbatch(%d): position" % index)
        if seq.numel() != pos.numel():
            _fail("microbatch(%d): sequence has %d entries but position has %d"
                  % (index, seq.numel(), pos.numel()))
        val = _as_valid_vector(valid, seq.numel(), "microbatch(%d): valid" % index)
        if val.numel() != seq.numel():
            _fail("microbatch(%d): valid has %d entries but sequence has %d" % (index, val.numel(), seq.numel()))
        if seq.numel():
            bad = ((pos < 0) | (pos >= self.seq_len)).nonzero()
            if bad.numel():
                i = int(bad[0])
                _fail("microbatch(%d): position[%d] = %d is outside [0, seq_len=%d)"
                      % (index, i, int(pos[i]), self.seq_len))
            bad = (seq < 0).nonzero()
            if bad.numel():
                i = int(bad[0])
                _fail("microbatch(%d): sequence[%d] = %d is negative" % (index, i, int(seq[i])))
            key = seq * self.seq_len + pos
            if torch.unique(key).numel() != key.numel():
                srt, order = torch.sort(key)
                j = int((srt[1:] == srt[:-1]).nonzero()[0])
                a, b = sorted((int(order[j]), int(order[j + 1])))
                _fail("microbatch(%d): rows %d and %d are the same token (sequence %d, position %d)"
                      % (index, a, b, int(seq[a]), int(pos[a])))
        mb = _Microbatch(index, seq, pos, val)
        self._active = mb
        try:
            yield mb
        except BaseException:
            self._active = None
            raise
        self._active = None
        self._done[index] = mb
        for layer in self._layers.values():
            if index not in layer.inputs:
                _fail("layer %d: its router did not run in microbatch %d (attach only the routers of the "
                      "layers this rank computes)" % (layer.index, index))

    def record_topk(self, layer_index, topk):
        """Optional: the experts the job routed each row of the active microbatch to, [..., k] flattened to
        [n, k] in the router's row order. Record it for every microbatch of a layer or for none."""
        layer = self._layers.get(layer_index)
        if layer is None:
            _fail("record_topk: layer %r is not attached" % (layer_index,))
        mb = self._active
        name = "layer%d.mb%s.topk" % (layer_index, "?" if mb is None else mb.index)
        if mb is None:
            _fail("record_topk(%d) outside cap.microbatch(...)" % layer_index)
        if mb.index not in layer.inputs:
            _fail("record_topk(%d): %s recorded before the router of layer %d ran in microbatch %d"
                  % (layer_index, name, layer_index, mb.index))
        if mb.index in layer.topk:
            _fail("record_topk(%d): %s was already recorded" % (layer_index, name))
        if not isinstance(topk, torch.Tensor) or topk.dtype.is_floating_point or topk.dim() < 1:
            _fail("record_topk(%d): %s must be an integer tensor [..., k]" % (layer_index, name))
        k = self.objective["top_k"]
        if topk.shape[-1] != k:
            _fail("record_topk(%d): %s has last dimension %d, objective.top_k is %d"
                  % (layer_index, name, topk.shape[-1], k))
        t = topk.detach().to("cpu").reshape(-1, k).to(torch.int64)
        if t.shape[0] != mb.rows:
            _fail("record_topk(%d): %s has %d rows but microbatch %d has %d token ids"
                  % (layer_index, name, t.shape[0], mb.index, mb.rows))
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= layer.experts):
            _fail("record_topk(%d): %s holds expert %d, outside [0, E=%d)" % (
                layer_index, name, int(t.min()) if int(t.min()) < 0 else int(t.max()), layer.experts))
        layer.topk[mb.index] = t.clone()

    def save(self, grads=None):
        """Write CAPTURE_DIR/rank{R}.safetensors and remove the hooks. Call it after the framework's gradient
        sync and finalisation and before optimizer.step(). grads: optional {layer_index: full [E, H]
        gradient} for frameworks that keep the gradient elsewhere (gather shards first). Returns the path."""
        if self._saved is not None:
            _fail("save() was already called (%s)" % self._saved)
        if self._active is not None:
            _fail("save() inside cap.microbatch(%d)" % self._active.index)
        if self._main_loss_scale != 0.0:
            _fail("main_loss_scale is %r: a capture needs the main loss multiplied by 0, otherwise the "
                  "gradient holds main-loss terms that no aux reference reproduces" % self._main_loss_scale)
        if not self._layers:
            _fail("save(): no router attached (call attach(layer_index, module) for each layer)")
        if not self._done:
            _fail("save() before any microbatch ran")
        grads = dict(grads or {})
        for key in grads:
            if key not in self._layers:
                _fail("save(grads=...): layer %r is not attached" % (key,))
        tensors = []
        for index in sorted(self._layers):
            tensors.extend(self._layer_tensors(self._layers[index], grads.get(index)))
        manifest = self._manifest()
        blob = _safetensors_bytes(tensors, {METADATA_KEY: json.dumps(manifest, sort_keys=False)})
        os.makedirs(self.directory, exist_ok=True)
        self._check_directory()
        path = os.path.join(self.directory, "rank%d.safetensors" % self.rank)
        tmp = path + ".tmp%d" % os.getpid()
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        self.remove_hooks()
        self._saved = path
        return path

    def remove_hooks(self):
        """Remove the pre-hooks (training continues with the router inputs attached again)."""
        for layer in self._layers.values():
            for h in layer.handles:
                h.remove()
            layer.handles = []
            if getattr(layer.module, "_moe_lbcheck_capture", None) is self:
                del layer.module._moe_lbcheck_capture

    # -- internals ---------------------------------------------------------------------------------------

    def _on_router_input(self, layer, args):
        if self._saved is not None:
            return None
        mb = self._active
        if mb is None:
            _fail("layer %d: the router forward ran outside cap.microbatch(...): wrap each microbatch's "
                  "forward in it (activation recomputation is not supported while capturing)" % layer.index)
        name = "layer%d.mb%d.input" % (layer.index, mb.index)
        if not args or not isinstance(args[0], torch.Tensor):
            _fail("layer %d: the router module got no positional tensor input (%s)" % (layer.index, name))
        x = args[0]
        if mb.index in layer.inputs:
            _fail("layer %d: the router ran twice in microbatch %d (a module shared by two layers, or "
                  "activation recomputation inside the microbatch)" % (layer.index, mb.index))
        if x.dim() < 1 or x.shape[-1] != layer.hidden:
            _fail("layer %d: %s has shape %s, expected [..., H=%d] (layer%d.weight is [%d, %d])" % (
                layer.index, name, list(x.shape), layer.hidden, layer.index, layer.experts, layer.hidden))
        if x.dtype not in _FLOAT_DTYPES:
            _fail("layer %d: %s has dtype %s, expected a float dtype" % (layer.index, name, x.dtype))
        rows = x.detach().reshape(-1, layer.hidden)
        if rows.shape[0] != mb.rows:
            _fail("layer %d: %s has %d rows (input shape %s) but cap.microbatch(%d) was given %d token ids"
                  % (layer.index, name, rows.shape[0], list(x.shape), mb.index, mb.rows))
        layer.inputs[mb.index] = rows.to("cpu", copy=True)
        if layer.weight_at_forward is None:
            layer.weight_at_forward = _full(layer.weight).detach().to("cpu", copy=True)
            layer.grad_hook_calls = 0
        return (x.detach(),) + tuple(args[1:])

    def _layer_tensors(self, layer, grad_override):
        l = layer.index
        if layer.weight_at_forward is None:
            _fail("layer %d is attached but its router never ran inside cap.microbatch(...)" % l)
        weight = _full(layer.weight).detach().to("cpu")
        if not torch.equal(weight, layer.weight_at_forward):
            _fail("layer%d.weight changed since the forward: call save() before optimizer.step()" % l)
        if grad_override is not None:
            grad = grad_override
        else:
            grad = _grad_of(layer.weight)
            if grad is None:
                _fail("layer%d.weight.grad: the router weight has no gradient (param.main_grad and "
                      "param.grad are None): call save() after backward and the gradient sync" % l)
            if layer.grad_hook_calls == 0:
                _fail("layer%d.weight.grad: no backward reached the router weight since the first "
                      "microbatch: save() before backward? (Where a wrapper such as FSDP1 flattens the "
                      "parameter, pass the gathered gradient: save(grads={%d: full_grad}).)" % (l, l))
        if not isinstance(grad, torch.Tensor):
            _fail("layer%d.weight.grad must be a tensor, got %s" % (l, type(grad).__name__))
        grad = _full(grad).detach().to("cpu")
        if list(grad.shape) != list(weight.shape):
            _fail("layer%d.weight.grad has shape %s, expected %s (gather sharded gradients first)"
                  % (l, list(grad.shape), list(weight.shape)))
        if grad.dtype not in _FLOAT_DTYPES:
            _fail("layer%d.weight.grad has dtype %s, expected a float dtype" % (l, grad.dtype))
        if layer.topk and len(layer.topk) != len(layer.inputs):
            missing = sorted(set(layer.inputs) - set(layer.topk))
            _fail("layer%d: top-k recorded for microbatches %s but not %s: record it for every microbatch "
                  "or for none" % (l, sorted(layer.topk), missing))
        out = [("layer%d.weight" % l, weight), ("layer%d.weight.grad" % l, grad)]
        if layer.expert_bias is not None:
            out.append(("layer%d.expert_bias" % l, _full(layer.expert_bias).detach().to("cpu")))
        for m in sorted(layer.inputs):
            mb = self._done[m]
            p = "layer%d.mb%d." % (l, m)
            out += [(p + "input", layer.inputs[m]), (p + "sequence", mb.sequence),
                    (p + "position", mb.position), (p + "valid", mb.valid.to(torch.uint8))]
            if m in layer.topk:
                out.append((p + "topk", layer.topk[m]))
        return out

    def _manifest(self):
        return {
            "schema_version": SCHEMA_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "mesh": dict(self.mesh),
            "layers": sorted(self._layers),
            "seq_len": self.seq_len,
            "objective": dict(self.objective),
            "router_inputs_detached": True,
            "main_loss_scale": self._main_loss_scale,
            "framework": self.framework,
            "created_by": "moe_lbcheck_capture.py %s (torch %s)" % (__version__, torch.__version__),
        }

    def _check_directory(self):
        # verify rejects rank files beyond world_size: they would come from another run.
        for name in os.listdir(self.directory):
            m = re.match(r"^rank(\d+)\.safetensors$", name)
            if m and int(m.group(1)) >= self.world_size:
                _fail("%s holds %s but world_size is %d: write each capture to a fresh directory"
                      % (self.directory, name, self.world_size))


def _safetensors_bytes(tensors, metadata):
    """Serialize [(name, tensor)] in the safetensors layout: u64 little-endian header length, a JSON
    header (with "__metadata__": string -> string), padded with spaces so the data starts 8-byte
    aligned, then the tensors' bytes back to back, widest element type first (as the reference
    implementation orders them), so that every tensor is aligned to its element size in a mapped file."""
    if sys.byteorder != "little":
        _fail("this helper writes safetensors on little-endian hosts only")
    header = {"__metadata__": metadata}
    chunks, offset = [], 0
    for name, t in sorted(tensors, key=lambda nt: (-nt[1].element_size(), nt[0])):
        dtype = _FLOAT_DTYPES.get(t.dtype) or _INT_DTYPES.get(t.dtype)
        if dtype is None:
            _fail("%s has dtype %s, which the capture format does not carry" % (name, t.dtype))
        data = _bytes_of(t)
        header[name] = {"dtype": dtype, "shape": [int(s) for s in t.shape],
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("ascii")
    text += b" " * ((-len(text)) % 8)
    return b"".join([struct.pack("<Q", len(text)), text] + chunks)


# -- token ids for common layouts ----------------------------------------------------------------------

def cp_positions(seq_len, cp_size, cp_rank, zigzag=False):
    """The positions of every sequence that context-parallel rank `cp_rank` holds, in order: the cp_rank-th
    of cp_size contiguous chunks, or (zigzag=True, the load-balanced layout of Megatron-LM /
    TransformerEngine and torchtitan) chunks cp_rank and 2*cp_size-1-cp_rank of 2*cp_size equal chunks."""
    if not _is_int(cp_size) or cp_size < 1 or not _is_int(cp_rank) or not 0 <= cp_rank < cp_size:
        _fail("cp_positions: need 0 <= cp_rank < cp_size, got cp_rank=%r cp_size=%r" % (cp_rank, cp_size))
    chunks = 2 * cp_size if zigzag else cp_size
    if seq_len % chunks:
        _fail("cp_positions: seq_len=%d is not divisible into %d %schunks"
              % (seq_len, chunks, "zigzag " if zigzag else ""))
    c = seq_len // chunks
    if not zigzag:
        return torch.arange(cp_rank * c, (cp_rank + 1) * c, dtype=torch.int64)
    second = 2 * cp_size - 1 - cp_rank
    return torch.cat([torch.arange(cp_rank * c, (cp_rank + 1) * c, dtype=torch.int64),
                      torch.arange(second * c, (second + 1) * c, dtype=torch.int64)])


def sp_positions(positions, tp_size, tp_rank):
    """The part of a rank's positions that sequence parallelism leaves to TP rank `tp_rank`: the tensor is
    split along the sequence dimension into tp_size contiguous parts (Megatron-LM
    scatter_to_sequence_parallel_region; torchtitan SequenceParallel shards the sequence dimension)."""
    pos = _as_index_vector(positions, "sp_positions: positions")
    if not _is_int(tp_size) or tp_size < 1 or not _is_int(tp_rank) or not 0 <= tp_rank < tp_size:
        _fail("sp_positions: need 0 <= tp_rank < tp_size, got tp_rank=%r tp_size=%r" % (tp_rank, tp_size))
    if pos.numel() % tp_size:
        _fail("sp_positions: %d positions are not divisible by tp_size=%d" % (pos.numel(), tp_size))
    c = pos.numel() // tp_size
    return pos[tp_rank * c:(tp_rank + 1) * c].clone()


def sequence_indices(dp_rank, microbatch, micro_batch_size, microbatches):
    """Global sequence indices of one microbatch when DP rank r holds the r-th contiguous share of the
    global batch and microbatch m is the m-th consecutive chunk of it. Any numbering that is unique in
    the global batch serves; use your sampler's own when it differs."""
    start = (dp_rank * microbatches + microbatch) * micro_batch_size
    return torch.arange(start, start + micro_batch_size, dtype=torch.int64)


def token_ids(sequences, positions, valid=None, layout="bs"):
    """(sequence, position, valid) for the rows of a router input of shape [B, S_local, H] (layout "bs",
    HF/torchtitan) or [S_local, B, H] (layout "sb", Megatron-LM), flattened as the router flattens them.
    sequences: the B global sequence indices of the batch rows. positions: the S_local positions held (see
    cp_positions, sp_positions). valid: None (all real), B per-sequence valid lengths (a position is real
    when it is < the length: right padding), or a bool mask in the input's own layout ([B, S_local] for
    "bs", [S_local, B] for "sb"; True = a real token)."""
    seq = _as_index_vector(sequences, "token_ids: sequences")
    pos = _as_index_vector(positions, "token_ids: positions")
    if layout not in ("bs", "sb"):
        _fail("token_ids: layout must be 'bs' ([B, S, H]) or 'sb' ([S, B, H]), got %r" % (layout,))
    b, s = seq.numel(), pos.numel()
    if valid is None:
        mask = torch.ones(b, s, dtype=torch.bool)
    elif isinstance(valid, torch.Tensor) and valid.dim() == 2:
        want = [b, s] if layout == "bs" else [s, b]
        if list(valid.shape) != want:
            _fail("token_ids: the valid mask has shape %s, expected %s for layout %r"
                  % (list(valid.shape), want, layout))
        mask = _as_valid_vector(valid, b * s, "token_ids: valid").reshape(want)
        if layout == "sb":
            mask = mask.t()
    else:
        lengths = _as_index_vector(valid, "token_ids: valid lengths")
        if lengths.numel() != b:
            _fail("token_ids: %d valid lengths for %d sequences" % (lengths.numel(), b))
        mask = pos.unsqueeze(0) < lengths.unsqueeze(1)
    grid_seq = seq.unsqueeze(1).expand(b, s)
    grid_pos = pos.unsqueeze(0).expand(b, s)
    if layout == "sb":
        grid_seq, grid_pos, mask = grid_seq.t(), grid_pos.t(), mask.t()
    return (grid_seq.reshape(-1).clone(), grid_pos.reshape(-1).clone(), mask.reshape(-1).clone())
