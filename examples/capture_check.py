"""Independent checks of a capture directory, for the example driver (run_examples.py).

Shares no code with the capture helper it checks (python/moe_lbcheck_capture.py) or with the job that
wrote the capture:
  * load_capture(dir): reads every CAPTURE_DIR/rank{R}.safetensors with its own safetensors reader and
    enforces capture format v1 (file names, manifest keys and consistency, tensor names, shapes and
    dtypes, one token set per layer, equal weights), raising CaptureInvalid(file, item, what).
  * self_check(capture): the float64 gradient of the declared objective from the recorded router inputs
    (autograd on the closed form, not moe-lbcheck's finite differences), compared with the lowest
    holding rank's gradient (scale, cosine) and with the replicas. The driver uses it to confirm that
    each case's hand-derived expectation is what the job's arithmetic produces, before and besides
    `moe-lbcheck verify`.
"""

import json
import os
import re
import struct

import torch

METADATA_KEY = "moe_lbcheck_capture"
MANIFEST_REQUIRED = ("schema_version", "rank", "world_size", "mesh", "layers", "seq_len", "objective",
                     "router_inputs_detached", "main_loss_scale")
MANIFEST_OPTIONAL = ("framework", "created_by")
MESH_KEYS = ("dp", "dp_size", "cp", "cp_size", "pp", "pp_size", "tp", "tp_size", "ep", "ep_size",
             "microbatches")
MESH_OPTIONAL = ("tp", "tp_size", "ep", "ep_size")
OBJECTIVE_KEYS = ("aux_type", "coeff", "z_loss_coeff", "z_loss_scope", "top_k", "score", "norm_topk_prob",
                  "exclude_padding", "group_weighting", "compute_dtype")
SHARED = ("world_size", "seq_len", "objective", "router_inputs_detached", "main_loss_scale")
FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INTS = {"I64": torch.int64, "U8": torch.uint8, "BOOL": torch.bool}
SIZES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1, "BOOL": 1}
LAYER_TENSOR = re.compile(r"^layer(\d+)\.(weight|weight\.grad|expert_bias)$")
MB_TENSOR = re.compile(r"^layer(\d+)\.mb(\d+)\.(input|sequence|position|valid|topk)$")


class CaptureInvalid(Exception):
    def __init__(self, where, item, what):
        Exception.__init__(self, "%s: %s: %s" % (where, item, what))


def read_safetensors(path):
    """(metadata, {name: (dtype_code, tensor)}) from a safetensors file, checked for a well-formed header
    and a data buffer that the tensors cover exactly."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise CaptureInvalid(path, "header", "file shorter than 8 bytes")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise CaptureInvalid(path, "header", "header length %d exceeds the file (%d bytes)" % (n, len(raw)))
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except ValueError as e:
        raise CaptureInvalid(path, "header", "not JSON: %s" % e)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CaptureInvalid(path, "__metadata__", "missing, or not a string -> string map")
    data = memoryview(raw)[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in SIZES:
            raise CaptureInvalid(path, "/" + name, "dtype %r is not one the capture format allows" % (dtype,))
        shape, (begin, end) = info["shape"], info["data_offsets"]
        count = 1
        for s in shape:
            count *= s
        if end - begin != count * SIZES[dtype] or begin < 0 or end > len(data):
            raise CaptureInvalid(path, "/" + name, "data_offsets %s do not fit shape %s %s" % ([begin, end], shape, dtype))
        if (8 + n + begin) % SIZES[dtype]:
            raise CaptureInvalid(path, "/" + name, "starts at byte %d, not aligned to its %d-byte elements"
                                 % (8 + n + begin, SIZES[dtype]))
        spans.append((begin, end))
        t = torch.frombuffer(bytearray(data[begin:end]), dtype=FLOATS.get(dtype) or INTS[dtype]) if end > begin \
            else torch.empty(0, dtype=FLOATS.get(dtype) or INTS[dtype])
        tensors[name] = (dtype, t.reshape(shape))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise CaptureInvalid(path, "data", "a hole or an overlap at byte %d" % begin)
        pos = end
    if pos != len(data):
        raise CaptureInvalid(path, "data", "%d bytes, the tensors cover %d" % (len(data), pos))
    return meta, tensors


def _manifest(path, meta, rank):
    if set(meta) != {METADATA_KEY}:
        raise CaptureInvalid(path, "__metadata__", "expected the one key %r, got %s" % (METADATA_KEY, sorted(meta)))
    man = json.loads(meta[METADATA_KEY])
    for key in man:
        if key not in MANIFEST_REQUIRED + MANIFEST_OPTIONAL:
            raise CaptureInvalid(path, "/" + key, "unknown manifest key")
    for key in MANIFEST_REQUIRED:
        if key not in man:
            raise CaptureInvalid(path, "/" + key, "required manifest key missing")
    if man["schema_version"] != 1:
        raise CaptureInvalid(path, "/schema_version", "expected 1, got %r" % man["schema_version"])
    if man["rank"] != rank:
        raise CaptureInvalid(path, "/rank", "file is rank%d, manifest says %r" % (rank, man["rank"]))
    mesh = man["mesh"]
    for key in mesh:
        if key not in MESH_KEYS:
            raise CaptureInvalid(path, "/mesh/" + key, "unknown mesh key")
    for key in MESH_KEYS:
        if key not in mesh and key not in MESH_OPTIONAL:
            raise CaptureInvalid(path, "/mesh/" + key, "required mesh key missing")
    for dim in ("dp", "cp", "pp", "tp", "ep"):
        size, coord = mesh.get(dim + "_size", 1), mesh.get(dim, 0)
        if not (isinstance(size, int) and size >= 1 and isinstance(coord, int) and 0 <= coord < size):
            raise CaptureInvalid(path, "/mesh/" + dim, "coordinate %r outside [0, %r)" % (coord, size))
    for key in man["objective"]:
        if key not in OBJECTIVE_KEYS:
            raise CaptureInvalid(path, "/objective/" + key, "unknown objective key")
    if man["router_inputs_detached"] is not True:
        raise CaptureInvalid(path, "/router_inputs_detached", "must be true")
    if man["main_loss_scale"] != 0:
        raise CaptureInvalid(path, "/main_loss_scale", "must be 0, got %r" % man["main_loss_scale"])
    return man


def load_capture(directory):
    """The capture as {"manifests": [...], "files": [...], "layers": {l: {...}}}, every rule enforced."""
    names = sorted(n for n in os.listdir(directory) if re.match(r"^rank.*\.safetensors$", n))
    if not names:
        raise CaptureInvalid(directory, "rank0.safetensors", "no rank files")
    files, manifests, tensors = [], [], []
    first = os.path.join(directory, "rank0.safetensors")
    if not os.path.exists(first):
        raise CaptureInvalid(directory, "rank0.safetensors", "missing")
    meta0, _ = read_safetensors(first)
    world = json.loads(meta0.get(METADATA_KEY, "{}")).get("world_size")
    expected = ["rank%d.safetensors" % r for r in range(world or 0)]
    if sorted(names) != sorted(expected):
        raise CaptureInvalid(directory, "rank files", "expected %s, found %s" % (expected, names))
    for r in range(world):
        path = os.path.join(directory, "rank%d.safetensors" % r)
        meta, t = read_safetensors(path)
        man = _manifest(path, meta, r)
        files.append(path)
        manifests.append(man)
        tensors.append(t)
    m0 = manifests[0]
    coords = set()
    for r, man in enumerate(manifests):
        for key in SHARED:
            if man[key] != m0[key]:
                raise CaptureInvalid(files[r], "/" + key, "differs from rank0's (%r vs %r)" % (man[key], m0[key]))
        for key in MESH_KEYS:
            if key.endswith("_size") or key == "microbatches":
                if man["mesh"].get(key, 1) != m0["mesh"].get(key, 1):
                    raise CaptureInvalid(files[r], "/mesh/" + key, "differs from rank0's")
        c = tuple(man["mesh"].get(d, 0) for d in ("dp", "cp", "pp", "tp"))
        if c in coords:
            raise CaptureInvalid(files[r], "/mesh", "coordinates %s are also another rank's" % (c,))
        coords.add(c)
    mesh0 = m0["mesh"]
    product = 1
    for d in ("dp", "cp", "pp", "tp"):
        product *= mesh0.get(d + "_size", 1)
    if product != world:
        raise CaptureInvalid(files[0], "/mesh", "dp*cp*pp*tp sizes = %d, world_size = %d" % (product, world))
    M, S, k = mesh0["microbatches"], m0["seq_len"], m0["objective"]["top_k"]

    layers = {}
    for r in range(world):
        held = manifests[r]["layers"]
        for name, (dtype, t) in tensors[r].items():
            a, b = LAYER_TENSOR.match(name), MB_TENSOR.match(name)
            if not (a or b):
                raise CaptureInvalid(files[r], "/" + name, "not a tensor name of the capture format")
            l = int((a or b).group(1))
            if l not in held:
                raise CaptureInvalid(files[r], "/" + name, "layer %d is not in this rank's layers %s" % (l, held))
            if b and int(b.group(2)) >= M:
                raise CaptureInvalid(files[r], "/" + name, "microbatch >= microbatches=%d" % M)
        for l in held:
            t = tensors[r]
            need = ["layer%d.weight" % l, "layer%d.weight.grad" % l]
            for name in need:
                if name not in t or t[name][0] not in FLOATS or t[name][1].dim() != 2:
                    raise CaptureInvalid(files[r], "/" + name, "missing, or not a 2-D float tensor")
            E, H = t[need[0]][1].shape
            if list(t[need[1]][1].shape) != [E, H]:
                raise CaptureInvalid(files[r], "/" + need[1], "shape %s, expected [%d, %d]" % (list(t[need[1]][1].shape), E, H))
            entry = layers.setdefault(l, {"ranks": [], "E": E, "H": H, "rows": {}, "grads": {}, "weights": {},
                                          "topk_seen": set()})
            entry["ranks"].append(r)
            entry["weights"][r] = t[need[0]][1].double()
            entry["grads"][r] = t[need[1]][1].double()
            mbs = sorted({int(MB_TENSOR.match(n).group(2)) for n in t if MB_TENSOR.match(n)
                          and int(MB_TENSOR.match(n).group(1)) == l})
            for m in mbs:
                p = "layer%d.mb%d." % (l, m)
                for key, dt in (("input", FLOATS), ("sequence", {"I64": 1}), ("position", {"I64": 1}),
                                ("valid", {"U8": 1, "BOOL": 1})):
                    if p + key not in t or t[p + key][0] not in dt:
                        raise CaptureInvalid(files[r], "/" + p + key, "missing or of the wrong dtype")
                x, seq, pos, val = (t[p + key][1] for key in ("input", "sequence", "position", "valid"))
                n = seq.numel()
                if list(x.shape) != [n, H] or list(pos.shape) != [n] or list(val.shape) != [n] or seq.dim() != 1:
                    raise CaptureInvalid(files[r], "/" + p + "input", "shapes disagree: input %s, %d ids"
                                         % (list(x.shape), n))
                if n and (int(pos.min()) < 0 or int(pos.max()) >= S):
                    raise CaptureInvalid(files[r], "/" + p + "position", "outside [0, seq_len=%d)" % S)
                topk = None
                if p + "topk" in t:
                    topk = t[p + "topk"][1]
                    if t[p + "topk"][0] != "I64" or list(topk.shape) != [n, k]:
                        raise CaptureInvalid(files[r], "/" + p + "topk", "expected [%d, %d] I64" % (n, k))
                entry["topk_seen"].add(topk is not None)
                for i in range(n):
                    key = (int(seq[i]), int(pos[i]))
                    row = (x[i].double(), bool(val[i]), manifests[r]["mesh"].get("dp", 0), m,
                           None if topk is None else tuple(topk[i].tolist()))
                    old = entry["rows"].get(key)
                    if old is not None:
                        if not (torch.equal(old[0], row[0]) and old[1:] == row[1:]):
                            raise CaptureInvalid(files[r], "/" + p + "input",
                                                 "token %s differs from another rank's record" % (key,))
                    else:
                        entry["rows"][key] = row
    token_sets = {l: set(e["rows"]) for l, e in layers.items()}
    for l, e in layers.items():
        if len(e["topk_seen"]) > 1:
            raise CaptureInvalid(directory, "layer%d topk" % l, "recorded for some microbatches, not all")
        if token_sets[l] != token_sets[min(layers)]:
            raise CaptureInvalid(directory, "layer%d" % l, "token set differs from layer%d's" % min(layers))
        w0 = e["weights"][e["ranks"][0]]
        for r in e["ranks"][1:]:
            if not torch.allclose(e["weights"][r], w0, rtol=1e-6, atol=0):
                raise CaptureInvalid(files[r], "/layer%d.weight" % l, "differs from rank%d's" % e["ranks"][0])
    return {"directory": directory, "manifests": manifests, "files": files, "layers": layers}


def _reference_grad(entry, objective):
    """dJ_l/dW_l in float64 for J_l = alpha * aux + beta * z-loss of one layer, from the recorded rows."""
    keys = sorted(entry["rows"])
    x = torch.stack([entry["rows"][key][0] for key in keys])
    valid = torch.tensor([entry["rows"][key][1] for key in keys])
    dp = torch.tensor([entry["rows"][key][2] for key in keys])
    mb = torch.tensor([entry["rows"][key][3] for key in keys])
    seq = torch.tensor([key[0] for key in keys])
    E, k = entry["E"], objective["top_k"]
    W = entry["weights"][entry["ranks"][0]].clone().requires_grad_()
    z = x @ W.t()
    if objective["score"] == "softmax":
        p = torch.softmax(z, dim=-1)
    else:
        s = torch.sigmoid(z)
        p = s / s.sum(dim=-1, keepdim=True)
    recorded = entry["rows"][keys[0]][4] is not None
    topk = torch.tensor([entry["rows"][key][4] for key in keys]) if recorded else \
        torch.topk(p.detach(), k, dim=-1).indices
    routed = torch.zeros_like(p).scatter_(1, topk, 1.0)
    use = valid if objective.get("exclude_padding", True) else torch.ones_like(valid)
    weighting = objective.get("group_weighting", "uniform")

    def combine(values, tokens):
        values, tokens = torch.stack(values), torch.tensor(tokens, dtype=torch.float64)
        if weighting == "tokens":
            return (values * tokens).sum() / tokens.sum()
        return values.mean()

    def groups_of(scope):
        if scope == "micro_batch":
            key = dp * 1000003 + mb
        elif scope == "sequence":
            key = seq
        else:
            key = torch.zeros_like(seq)
        return [(key == g) & use for g in torch.unique(key)]

    aux_vals, aux_tokens = [], []
    for g in groups_of(objective["aux_type"]):
        T = int(g.sum())
        if T == 0:
            continue
        c = routed[g].sum(0)
        P = p[g].sum(0) / T
        aux_vals.append(E / (k * T) * (c * P).sum())
        aux_tokens.append(T)
    J = objective["coeff"] * combine(aux_vals, aux_tokens)
    beta = objective.get("z_loss_coeff", 0.0)
    if beta:
        lse2 = torch.logsumexp(z, dim=-1) ** 2
        z_vals, z_tokens = [], []
        for g in groups_of(objective.get("z_loss_scope", "micro_batch")):
            T = int(g.sum())
            if T:
                z_vals.append(lse2[g].sum() / T)
                z_tokens.append(T)
        J = J + beta * combine(z_vals, z_tokens)
    (grad,) = torch.autograd.grad(J, W)
    return grad


def self_check(capture):
    """Per layer: scale and cosine of the lowest holding rank's gradient against the float64 reference,
    the largest element error relative to the reference's largest element, and the replicas that differ."""
    objective = capture["manifests"][0]["objective"]
    out = {}
    for l, entry in sorted(capture["layers"].items()):
        ref = _reference_grad(entry, objective).reshape(-1)
        g = entry["grads"][entry["ranks"][0]].reshape(-1)
        rr = float(ref @ ref)
        gn = float(g.norm())
        scale = float(g @ ref) / rr if rr else float("nan")
        cosine = float(g @ ref) / (gn * rr ** 0.5) if gn and rr else 0.0
        diverging = [r for r in entry["ranks"][1:]
                     if not torch.allclose(entry["grads"][r].reshape(-1), g, rtol=1e-6, atol=1e-12 * max(gn, 1e-300))]
        out[l] = {"scale": scale, "cosine": cosine, "norm_ratio": gn / rr ** 0.5 if rr else float("nan"),
                  "max_rel_err": float((g - ref).abs().max() / ref.abs().max()), "diverging_ranks": diverging,
                  "lowest_rank": entry["ranks"][0]}
    return out
