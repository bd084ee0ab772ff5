"""Tests of moe_lbcheck_capture: single process, torch only, a few seconds (the venv test about 15 s).

    /usr/bin/python3 -m unittest discover -s python/tests -v

The capture files are read back with a minimal safetensors reader written here from the format's
published description (u64 little-endian header length, JSON header, data buffer), sharing no code
with the helper, so a writer bug cannot hide behind a reader with the same bug.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest

try:
    import torch
except ImportError as e:  # CTest runs this file directly and reads 77 as "skipped"
    if __name__ == "__main__":
        print("SKIP: torch is not importable by %s (%s)" % (sys.executable, e))
        sys.exit(77)
    raise unittest.SkipTest("torch is not importable: %s" % e)

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHON_DIR = os.path.dirname(HERE)
sys.path.insert(0, PYTHON_DIR)

import moe_lbcheck_capture as lbc  # noqa: E402

# -- independent reader ------------------------------------------------------------------------------

_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "BF16": (torch.bfloat16, 2),
           "F16": (torch.float16, 2), "I64": (torch.int64, 8), "U8": (torch.uint8, 1),
           "BOOL": (torch.bool, 1)}


def read_safetensors(path):
    """(metadata dict, {name: tensor}, header_len) with the checks a strict reader makes, including
    that every tensor starts at a multiple of its element size (a mapped file can be read in place)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        raise AssertionError("header length %d exceeds the file" % n)
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    spans, tensors = [], {}
    for name, info in header.items():
        if set(info) != {"dtype", "shape", "data_offsets"}:
            raise AssertionError("%s: header keys %s" % (name, sorted(info)))
        dtype, size = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        count = 1
        for s in info["shape"]:
            count *= s
        if end - begin != count * size:
            raise AssertionError("%s: %d bytes for shape %s" % (name, end - begin, info["shape"]))
        if (8 + n + begin) % size:
            raise AssertionError("%s (%s) starts at byte %d, not aligned to %d" % (name, info["dtype"],
                                                                                 8 + n + begin, size))
        spans.append((begin, end))
        buf = bytearray(data[begin:end])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    # The buffer is indexed completely, without holes or overlaps (as the reference reader demands).
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise AssertionError("data buffer has a hole or an overlap at byte %d" % begin)
        pos = end
    if pos != len(data):
        raise AssertionError("data buffer is %d bytes, tensors cover %d" % (len(data), pos))
    return meta, tensors, n


# -- a tiny MoE layer stack ---------------------------------------------------------------------------

H, E, K, S = 6, 4, 2, 5


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.proj = torch.nn.Linear(H, H, bias=False)

    def forward(self, x):
        logits = self.gate(x)
        scores = torch.softmax(logits, dim=-1)
        weights, idx = torch.topk(scores, K, dim=-1)
        self.last_topk = idx
        aux = (scores.mean(dim=tuple(range(scores.dim() - 1))) ** 2).sum()
        return x + weights.sum(-1, keepdim=True) * torch.tanh(self.proj(x)), aux


class Model(torch.nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        self.layers = torch.nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, x):
        total = 0
        for layer in self.layers:
            x, aux = layer(x)
            total = total + aux
        return x, total


OBJECTIVE = dict(aux_type="micro_batch", coeff=0.01, top_k=K, score="softmax")


def new_capture(directory, **kw):
    args = dict(rank=1, world_size=2, mesh=dict(dp=1, dp_size=2, microbatches=2), seq_len=S,
                objective=dict(OBJECTIVE), framework="unit test")
    args.update(kw)
    return lbc.Capture(directory, **args)


def ids(b=2, s=S, first=0, lengths=None):
    return lbc.token_ids(range(first, first + b), range(s), lengths)


class CaptureFileTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.dir = tempfile.mkdtemp(prefix="lbc-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)

    def run_step(self, cap, model, dtype=torch.float32, topk=True, microbatches=2):
        lengths = [[5, 3], [4, 5]]
        for m in range(microbatches):
            seq, pos, valid = ids(first=2 * m + 4, lengths=lengths[m])
            x = torch.randn(2, S, H, dtype=dtype)
            with cap.microbatch(m, sequence=seq, position=pos, valid=valid):
                out, aux = model(x)
                if topk:
                    for l, layer in enumerate(model.layers):
                        cap.record_topk(l, layer.last_topk)
                (out.sum() * cap.main_loss_scale + aux).backward()

    def test_round_trip(self):
        model = Model()
        cap = new_capture(self.dir, objective=dict(OBJECTIVE, z_loss_coeff=1e-3, compute_dtype="float32"))
        for l, layer in enumerate(model.layers):
            cap.attach(l, layer.gate, expert_bias=torch.zeros(E) if l == 1 else None)
        self.run_step(cap, model)
        path = cap.save()
        self.assertEqual(path, os.path.join(self.dir, "rank1.safetensors"))
        self.assertEqual(sorted(os.listdir(self.dir)), ["rank1.safetensors"])

        meta, t, header_len = read_safetensors(path)
        self.assertEqual((8 + header_len) % 8, 0, "data should start 8-byte aligned")
        self.assertEqual(list(meta), ["moe_lbcheck_capture"])
        man = json.loads(meta["moe_lbcheck_capture"])
        self.assertEqual(set(man), {"schema_version", "rank", "world_size", "mesh", "layers", "seq_len",
                                    "objective", "router_inputs_detached", "main_loss_scale",
                                    "framework", "created_by"})
        self.assertEqual(man["schema_version"], 1)
        self.assertEqual((man["rank"], man["world_size"], man["seq_len"]), (1, 2, S))
        self.assertEqual(man["mesh"], {"dp": 1, "dp_size": 2, "cp": 0, "cp_size": 1, "pp": 0, "pp_size": 1,
                                       "tp": 0, "tp_size": 1, "ep": 0, "ep_size": 1, "microbatches": 2})
        self.assertEqual(man["layers"], [0, 1])
        self.assertEqual(man["objective"], {
            "aux_type": "micro_batch", "coeff": 0.01, "top_k": K, "score": "softmax", "z_loss_coeff": 1e-3,
            "z_loss_scope": "micro_batch", "norm_topk_prob": False, "exclude_padding": True,
            "group_weighting": "uniform", "compute_dtype": "float32"})
        self.assertIs(man["router_inputs_detached"], True)
        self.assertEqual(man["main_loss_scale"], 0.0)
        self.assertEqual(man["framework"], "unit test")

        names = {"layer0.weight", "layer0.weight.grad", "layer1.weight", "layer1.weight.grad",
                 "layer1.expert_bias"}
        for l in range(2):
            for m in range(2):
                names |= {"layer%d.mb%d.%s" % (l, m, k) for k in ("input", "sequence", "position", "valid",
                                                                    "topk")}
        self.assertEqual(set(t), names)
        for l, layer in enumerate(model.layers):
            self.assertEqual(t["layer%d.weight" % l].dtype, torch.float32)
            self.assertTrue(torch.equal(t["layer%d.weight" % l], layer.gate.weight.detach()))
            self.assertTrue(torch.equal(t["layer%d.weight.grad" % l], layer.gate.weight.grad))
            for m in range(2):
                p = "layer%d.mb%d." % (l, m)
                self.assertEqual(list(t[p + "input"].shape), [2 * S, H])
                self.assertEqual(t[p + "input"].dtype, torch.float32)
                self.assertEqual(t[p + "sequence"].dtype, torch.int64)
                self.assertEqual(t[p + "position"].dtype, torch.int64)
                self.assertEqual(t[p + "valid"].dtype, torch.uint8)
                self.assertEqual(list(t[p + "topk"].shape), [2 * S, K])
                self.assertEqual(t[p + "topk"].dtype, torch.int64)
        self.assertEqual(t["layer0.mb1.sequence"].tolist(), [6] * S + [7] * S)
        self.assertEqual(t["layer0.mb1.position"].tolist(), list(range(S)) * 2)
        self.assertEqual(t["layer0.mb0.valid"].tolist(), [1] * 5 + [1, 1, 1, 0, 0])
        self.assertEqual(list(t["layer1.expert_bias"].shape), [E])

    def test_detach_cuts_cross_layer_gradient(self):
        model = Model().double()
        cap = new_capture(self.dir, mesh=dict(dp=1, dp_size=2, microbatches=1))
        cap.attach(1, model.layers[1].gate)
        seq, pos, valid = ids()
        x = torch.randn(2, S, H, dtype=torch.float64)
        with cap.microbatch(0, sequence=seq, position=pos, valid=valid):
            h1, _ = model.layers[0](x)
            _, aux1 = model.layers[1](h1)
            aux1.backward()
        # Layer 1's aux reaches layer 1's router but not layer 0 (its input was detached) ...
        self.assertIsNotNone(model.layers[1].gate.weight.grad)
        self.assertIsNone(model.layers[0].gate.weight.grad)
        path = cap.save()
        _, t, _ = read_safetensors(path)
        self.assertEqual(t["layer1.mb0.input"].dtype, torch.float64)
        self.assertTrue(torch.equal(t["layer1.mb0.input"], h1.detach().reshape(-1, H)))
        # ... and once saved the hooks are gone: the same call now sends gradient into layer 0.
        h1, _ = model.layers[0](x)
        _, aux1 = model.layers[1](h1)
        aux1.backward()
        self.assertIsNotNone(model.layers[0].gate.weight.grad)

    def test_main_grad_preferred(self):
        model = Model(layers=1)
        cap = new_capture(self.dir)
        cap.attach(0, model.layers[0].gate)
        self.run_step(cap, model, topk=False)
        w = model.layers[0].gate.weight
        w.main_grad = torch.full_like(w, 7.0)  # Megatron-LM keeps the reduced gradient here
        _, t, _ = read_safetensors(cap.save())
        self.assertTrue(bool((t["layer0.weight.grad"] == 7.0).all()))
        self.assertNotIn("layer0.mb0.topk", t)

    def test_bfloat16_and_grads_override(self):
        model = Model(layers=1).to(torch.bfloat16)
        cap = new_capture(self.dir)
        cap.attach(0, model.layers[0].gate)
        self.run_step(cap, model, dtype=torch.bfloat16)
        _, t, _ = read_safetensors(cap.save(grads={0: torch.ones(E, H, dtype=torch.float64)}))
        self.assertEqual(t["layer0.weight"].dtype, torch.bfloat16)
        self.assertEqual(t["layer0.mb0.input"].dtype, torch.bfloat16)
        self.assertEqual(t["layer0.weight.grad"].dtype, torch.float64)


class ErrorTest(unittest.TestCase):
    """Every error is raised at the call that caused it, and names the layer or tensor."""

    def setUp(self):
        torch.manual_seed(0)
        self.dir = tempfile.mkdtemp(prefix="lbc-test-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.model = Model()

    def raises(self, pattern):
        return self.assertRaisesRegex(lbc.CaptureError, pattern)

    def attached(self, **kw):
        # One live capture per model: drop the hooks of the one before.
        if getattr(self, "cap", None) is not None:
            self.cap.remove_hooks()
        cap = self.cap = new_capture(self.dir, **kw)
        for l, layer in enumerate(self.model.layers):
            cap.attach(l, layer.gate)
        return cap

    def test_constructor(self):
        with self.raises("mesh: unknown key 'dpp'"):
            new_capture(self.dir, mesh=dict(dpp=2))
        with self.raises(r"tp_size\*cp_size\*dp_size\*pp_size = 1\*1\*1\*1 = 1, but world_size = 2"):
            new_capture(self.dir, mesh=dict(microbatches=2))
        with self.raises(r"mesh.dp must be an integer in \[0, dp_size=2\), got 2"):
            new_capture(self.dir, mesh=dict(dp=2, dp_size=2))
        with self.raises("objective: unknown key 'alpha'"):
            new_capture(self.dir, objective=dict(OBJECTIVE, alpha=1))
        with self.raises("objective.top_k is required"):
            new_capture(self.dir, objective=dict(aux_type="micro_batch", coeff=0.1, score="softmax"))
        with self.raises("objective.aux_type must be one of micro_batch, sequence, global_batch"):
            new_capture(self.dir, objective=dict(OBJECTIVE, aux_type="batch"))
        with self.raises("objective.coeff must be a finite number >= 0"):
            new_capture(self.dir, objective=dict(OBJECTIVE, coeff=-1))
        with self.raises(r"rank must be an integer in \[0, world_size=2\), got 2"):
            new_capture(self.dir, rank=2)

    def test_attach(self):
        cap = new_capture(self.dir)
        with self.raises("attach: layer_index must be an integer >= 0"):
            cap.attach(-1, self.model.layers[0].gate)
        with self.raises("attach.3.: module must be a torch.nn.Module"):
            cap.attach(3, self.model.layers[0].gate.weight)
        with self.raises(r"attach\(3\): ReLU has no .weight"):
            cap.attach(3, torch.nn.ReLU())
        frozen = torch.nn.Linear(H, E, bias=False).requires_grad_(False)
        with self.raises(r"attach\(3\): layer3.weight does not require grad"):
            cap.attach(3, frozen)
        with self.raises(r"layer3.expert_bias must be a float tensor of shape \[4\]"):
            cap.attach(3, self.model.layers[0].gate, expert_bias=torch.zeros(E + 1))
        with self.raises(r"attach\(3\): objective.top_k = 5 but layer3.weight has only 4 experts"):
            new_capture(self.dir, objective=dict(OBJECTIVE, top_k=5)).attach(3, torch.nn.Linear(H, E))
        cap.attach(0, self.model.layers[0].gate)
        with self.raises("layer 0 is already attached"):
            cap.attach(0, self.model.layers[1].gate)
        other = new_capture(self.dir)
        with self.raises(r"attach\(0\): this module is attached to another Capture"):
            other.attach(0, self.model.layers[0].gate)
        cap.remove_hooks()
        other.attach(0, self.model.layers[0].gate)

    def test_microbatch_arguments(self):
        cap = self.attached()
        seq, pos, valid = ids()
        with self.raises(r"microbatch index must be an integer in \[0, microbatches=2\), got 2"):
            with cap.microbatch(2, sequence=seq, position=pos):
                pass
        with self.raises(r"microbatch\(0\): sequence has 10 entries but position has 9"):
            with cap.microbatch(0, sequence=seq, position=pos[:-1]):
                pass
        with self.raises(r"microbatch\(0\): valid has 9 entries but sequence has 10"):
            with cap.microbatch(0, sequence=seq, position=pos, valid=valid[:-1]):
                pass
        with self.raises(r"microbatch\(0\): position\[3\] = 5 is outside \[0, seq_len=5\)"):
            with cap.microbatch(0, sequence=seq, position=torch.tensor([0, 1, 2, 5, 4] * 2)):
                pass
        with self.raises(r"microbatch\(0\): sequence\[0\] = -1 is negative"):
            with cap.microbatch(0, sequence=seq - 1, position=pos):
                pass
        with self.raises(r"microbatch\(0\): rows 0 and 5 are the same token \(sequence 0, position 0\)"):
            with cap.microbatch(0, sequence=torch.zeros(10, dtype=torch.long), position=pos):
                pass
        with self.raises(r"microbatch\(0\): valid must be bool or 0/1"):
            with cap.microbatch(0, sequence=seq, position=pos, valid=torch.full((10,), 2)):
                pass
        with self.raises(r"microbatch\(0\): sequence must hold integers"):
            with cap.microbatch(0, sequence=seq.double(), position=pos):
                pass

    def test_hook_errors_raised_at_the_forward(self):
        cap = self.attached()
        x = torch.randn(2, S, H)
        with self.raises(r"layer 0: the router forward ran outside cap.microbatch"):
            self.model(x)
        seq, pos, _ = ids()
        with self.raises(r"layer 0: layer0.mb0.input has 10 rows \(input shape \[2, 5, 6\]\) but "
                         r"cap.microbatch\(0\) was given 8 token ids"):
            with cap.microbatch(0, sequence=seq[:8], position=pos[:8]):
                self.model(x)
        # The failed microbatch is not recorded: it can be run again.
        with cap.microbatch(0, sequence=seq, position=pos):
            self.model(x)

    def test_hook_wrong_hidden_and_twice(self):
        cap = self.attached()
        seq, pos, _ = ids()
        with self.raises(r"layer 1: layer1.mb0.input has shape \[10, 7\], expected \[..., H=6\]"):
            with cap.microbatch(0, sequence=seq, position=pos):
                self.model.layers[0].gate(torch.randn(10, H))
                self.model.layers[1].gate(torch.randn(10, H + 1))
        cap = self.attached()
        with self.raises(r"layer 0: the router ran twice in microbatch 0"):
            with cap.microbatch(0, sequence=seq, position=pos):
                self.model.layers[0].gate(torch.randn(10, H))
                self.model.layers[0].gate(torch.randn(10, H))

    def test_layer_missing_in_microbatch_raised_at_exit(self):
        cap = self.attached()
        seq, pos, _ = ids()
        with self.raises(r"layer 1: its router did not run in microbatch 0"):
            with cap.microbatch(0, sequence=seq, position=pos):
                self.model.layers[0].gate(torch.randn(10, H))

    def test_nested_and_repeated_microbatch(self):
        cap = self.attached()
        seq, pos, _ = ids()
        with cap.microbatch(0, sequence=seq, position=pos):
            self.model(torch.randn(2, S, H))
            with self.raises(r"microbatch\(1\) entered while microbatch 0 is still active"):
                with cap.microbatch(1, sequence=seq, position=pos):
                    pass
        with self.raises("microbatch 0 was already recorded"):
            with cap.microbatch(0, sequence=seq, position=pos):
                pass

    def test_record_topk(self):
        cap = self.attached()
        seq, pos, _ = ids()
        with self.raises(r"record_topk\(0\) outside cap.microbatch"):
            cap.record_topk(0, torch.zeros(10, K, dtype=torch.long))
        with self.raises("record_topk: layer 5 is not attached"):
            cap.record_topk(5, torch.zeros(10, K, dtype=torch.long))
        with cap.microbatch(0, sequence=seq, position=pos):
            with self.raises(r"layer0.mb0.topk recorded before the router of layer 0 ran"):
                cap.record_topk(0, torch.zeros(10, K, dtype=torch.long))
            self.model(torch.randn(2, S, H))
            with self.raises(r"layer0.mb0.topk has last dimension 3, objective.top_k is 2"):
                cap.record_topk(0, torch.zeros(10, 3, dtype=torch.long))
            with self.raises(r"layer0.mb0.topk has 8 rows but microbatch 0 has 10 token ids"):
                cap.record_topk(0, torch.zeros(8, K, dtype=torch.long))
            with self.raises(r"layer0.mb0.topk holds expert 4, outside \[0, E=4\)"):
                cap.record_topk(0, torch.full((10, K), E, dtype=torch.long))
            with self.raises(r"layer0.mb0.topk must be an integer tensor"):
                cap.record_topk(0, torch.zeros(10, K))
            cap.record_topk(0, torch.zeros(2, S, K, dtype=torch.long))
            with self.raises(r"layer0.mb0.topk was already recorded"):
                cap.record_topk(0, torch.zeros(10, K, dtype=torch.long))

    def step(self, cap, microbatches=(0, 1), topk_in=(), backward=True):
        for m in microbatches:
            seq, pos, _ = ids(first=2 * m)
            with cap.microbatch(m, sequence=seq, position=pos):
                out, aux = self.model(torch.randn(2, S, H))
                for l in range(2):
                    if m in topk_in:
                        cap.record_topk(l, self.model.layers[l].last_topk)
                if backward:
                    (out.sum() * 0 + aux).backward()

    def test_save_refusals(self):
        cap = self.attached()
        with self.raises("save.. before any microbatch ran"):
            cap.save()
        cap = self.attached(main_loss_scale=1.0)
        self.step(cap)
        with self.raises("main_loss_scale is 1.0: a capture needs the main loss multiplied by 0"):
            cap.save()

    def test_save_before_backward(self):
        cap = self.attached()
        self.step(cap, backward=False)
        with self.raises(r"layer0.weight.grad: the router weight has no gradient"):
            cap.save()
        # A gradient left over from an earlier step does not count as this step's backward.
        self.model.zero_grad(set_to_none=False)
        for layer in self.model.layers:
            layer.gate.weight.grad = torch.zeros(E, H)
        cap = self.attached()
        self.step(cap, backward=False)
        with self.raises(r"layer0.weight.grad: no backward reached the router weight since the first "
                         r"microbatch: save\(\) before backward\?"):
            cap.save()

    def test_save_after_optimizer_step(self):
        cap = self.attached()
        self.step(cap)
        torch.optim.SGD(self.model.parameters(), lr=0.1).step()
        with self.raises(r"layer0.weight changed since the forward: call save\(\) before optimizer.step\(\)"):
            cap.save()

    def test_save_mixed_topk(self):
        cap = self.attached()
        self.step(cap, topk_in=(1,))
        with self.raises(r"layer0: top-k recorded for microbatches \[1\] but not \[0\]"):
            cap.save()

    def test_save_inside_microbatch_twice_and_stale_files(self):
        cap = self.attached()
        seq, pos, _ = ids()
        with cap.microbatch(0, sequence=seq, position=pos):
            self.model(torch.randn(2, S, H))
            with self.raises(r"save\(\) inside cap.microbatch\(0\)"):
                cap.save()
        open(os.path.join(self.dir, "rank2.safetensors"), "wb").close()
        cap = self.attached()
        self.step(cap)
        with self.raises("holds rank2.safetensors but world_size is 2"):
            cap.save()
        os.remove(os.path.join(self.dir, "rank2.safetensors"))
        cap.save()
        with self.raises("save.. was already called"):
            cap.save()
        with self.raises(r"microbatch\(0\) after save\(\)"):
            with cap.microbatch(0, sequence=seq, position=pos):
                pass

    def test_layer_never_ran(self):
        cap = new_capture(self.dir)
        cap.attach(0, self.model.layers[0].gate)
        cap.attach(7, torch.nn.Linear(H, E, bias=False))
        seq, pos, _ = ids()
        with self.raises("layer 7: its router did not run in microbatch 0"):
            with cap.microbatch(0, sequence=seq, position=pos):
                self.model.layers[0].gate(torch.randn(10, H))


class TokenIdTest(unittest.TestCase):
    def test_cp_positions(self):
        self.assertEqual(lbc.cp_positions(8, 2, 0).tolist(), [0, 1, 2, 3])
        self.assertEqual(lbc.cp_positions(8, 2, 1).tolist(), [4, 5, 6, 7])
        # zigzag, cp=2: 4 chunks of 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
        self.assertEqual(lbc.cp_positions(8, 2, 0, zigzag=True).tolist(), [0, 1, 6, 7])
        self.assertEqual(lbc.cp_positions(8, 2, 1, zigzag=True).tolist(), [2, 3, 4, 5])
        # cp=3, 12 tokens: 6 chunks of 2; rank 1 holds chunks 1 and 4
        self.assertEqual(lbc.cp_positions(12, 3, 1, zigzag=True).tolist(), [2, 3, 8, 9])
        self.assertEqual(lbc.cp_positions(5, 1, 0).tolist(), [0, 1, 2, 3, 4])
        with self.assertRaisesRegex(lbc.CaptureError, "seq_len=6 is not divisible into 4 zigzag chunks"):
            lbc.cp_positions(6, 2, 0, zigzag=True)
        with self.assertRaisesRegex(lbc.CaptureError, "need 0 <= cp_rank < cp_size"):
            lbc.cp_positions(8, 2, 2)

    def test_sp_positions(self):
        self.assertEqual(lbc.sp_positions([0, 1, 6, 7], 2, 1).tolist(), [6, 7])
        self.assertEqual(lbc.sp_positions(range(6), 3, 0).tolist(), [0, 1])
        with self.assertRaisesRegex(lbc.CaptureError, "5 positions are not divisible by tp_size=2"):
            lbc.sp_positions(range(5), 2, 0)

    def test_sequence_indices(self):
        # dp rank 1 of a batch with 3 microbatches of 2 sequences: sequences 6..11; microbatch 2 = 10, 11
        self.assertEqual(lbc.sequence_indices(1, 2, micro_batch_size=2, microbatches=3).tolist(), [10, 11])
        self.assertEqual(lbc.sequence_indices(0, 0, 1, 1).tolist(), [0])

    def test_token_ids_bs(self):
        seq, pos, valid = lbc.token_ids([4, 9], [2, 3, 4], valid=[5, 3])
        self.assertEqual(seq.tolist(), [4, 4, 4, 9, 9, 9])
        self.assertEqual(pos.tolist(), [2, 3, 4, 2, 3, 4])
        self.assertEqual(valid.tolist(), [True, True, True, True, False, False])  # 2 < 3 is real
        self.assertEqual(seq.dtype, torch.int64)
        self.assertEqual(valid.dtype, torch.bool)

    def test_token_ids_sb(self):
        seq, pos, valid = lbc.token_ids([4, 9], [2, 3, 4], valid=[5, 3], layout="sb")
        self.assertEqual(seq.tolist(), [4, 9, 4, 9, 4, 9])
        self.assertEqual(pos.tolist(), [2, 2, 3, 3, 4, 4])
        self.assertEqual(valid.tolist(), [True, True, True, False, True, False])

    def test_token_ids_masks(self):
        mask_bs = torch.tensor([[True, False, True], [False, True, True]])
        _, _, valid = lbc.token_ids([0, 1], [0, 1, 2], valid=mask_bs)
        self.assertEqual(valid.tolist(), [True, False, True, False, True, True])
        _, _, valid = lbc.token_ids([0, 1], [0, 1, 2], valid=mask_bs.t(), layout="sb")
        self.assertEqual(valid.tolist(), [True, False, False, True, True, True])
        _, _, valid = lbc.token_ids([0, 1], [0, 1, 2], valid=torch.tensor([[1, 0, 1], [0, 1, 1]]))
        self.assertEqual(valid.tolist(), [True, False, True, False, True, True])
        with self.assertRaisesRegex(lbc.CaptureError, r"valid mask has shape \[2, 3\], expected \[3, 2\]"):
            lbc.token_ids([0, 1], [0, 1, 2], valid=mask_bs, layout="sb")
        with self.assertRaisesRegex(lbc.CaptureError, "3 valid lengths for 2 sequences"):
            lbc.token_ids([0, 1], [0, 1, 2], valid=[1, 2, 3])
        with self.assertRaisesRegex(lbc.CaptureError, "layout must be 'bs'"):
            lbc.token_ids([0], [0], layout="bsh")

    def test_cp_zigzag_with_sequence_parallel(self):
        # cp=2 zigzag then tp=2 sequence parallel on an [S, B] input: rank (cp 1, tp 1) of seq_len 8
        pos = lbc.sp_positions(lbc.cp_positions(8, 2, 1, zigzag=True), 2, 1)
        seq, p, _ = lbc.token_ids([0, 1], pos, layout="sb")
        self.assertEqual(p.tolist(), [4, 4, 5, 5])
        self.assertEqual(seq.tolist(), [0, 1, 0, 1])


class DocstringExampleTest(unittest.TestCase):
    def test_module_docstring_example_runs(self):
        """The usage example in the module docstring runs as written (one rank, stand-ins for the job)."""
        import contextlib
        example = lbc.__doc__.split("\n\n")[1]
        code = "\n".join(line[4:] for line in example.splitlines())
        self.assertEqual(len(example.splitlines()), 15)
        directory = tempfile.mkdtemp(prefix="lbc-doc-")
        self.addCleanup(shutil.rmtree, directory, True)

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.router = torch.nn.Module()
                self.router.gate = torch.nn.Linear(H, E, bias=False)

        class LM(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(10, H)
                self.layers = torch.nn.ModuleList([Block(), Block()])

            def forward(self, tokens, labels):
                h = self.embed(tokens)
                for layer in self.layers:
                    h = h + torch.softmax(layer.router.gate(h), -1) @ torch.ones(E, H)
                return h.pow(2).mean()

        model = LM()
        scope = dict(rank=0, world=1, S=S, dp_rank=0, dp=1, cp_rank=0, cp=1, M=2, B=2, PAD=0, model=model,
                     microbatches=[(torch.randint(0, 10, (2, S)), None) for _ in range(2)],
                     no_sync_unless_last=lambda m: contextlib.nullcontext(),
                     optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        exec(code.replace('"cap/"', repr(directory)), scope)
        self.assertEqual(os.listdir(directory), ["rank0.safetensors"])


class InstallTest(unittest.TestCase):
    def test_venv_install_offline(self):
        try:
            import venv  # noqa: F401
            import ensurepip  # noqa: F401
        except ImportError as e:
            self.skipTest("python3-venv is missing (%s): apt-get install -y --no-install-recommends "
                          "python3-venv" % e)
        work = tempfile.mkdtemp(prefix="lbc-venv-")
        self.addCleanup(shutil.rmtree, work, True)
        src = os.path.join(work, "src")
        # Build from a copy, so the source tree gets no build/ or egg-info.
        shutil.copytree(PYTHON_DIR, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                                       "tests"))
        env_dir = os.path.join(work, "V")
        r = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", env_dir],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if r.returncode != 0:
            self.skipTest("python3 -m venv failed (python3-venv missing?): " + r.stdout.strip()[-300:])
        py = os.path.join(env_dir, "bin", "python")
        r = subprocess.run([py, "-m", "pip", "install", "--no-build-isolation", "--no-index", src],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        self.assertEqual(r.returncode, 0, r.stdout)
        r = subprocess.run([py, "-c", "import moe_lbcheck_capture as m, sys; print(m.__file__); "
                                      "print(m.__version__)"], cwd=work,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        self.assertEqual(r.returncode, 0, r.stdout)
        self.assertIn(os.path.join(env_dir, "lib"), r.stdout)
        self.assertIn(lbc.__version__, r.stdout)


if __name__ == "__main__":
    unittest.main()
