#!/usr/bin/env python3
"""A small MoE language-model training step on torch.distributed, recorded as a moe-lbcheck capture.

    torchrun --nproc_per_node 4 examples/moe_ddp_job.py --dp 2 --cp 2 --microbatches 2 --capture-dir cap/
    moe-lbcheck verify cap/

What a Megatron-LM-, NeMo Automodel- or torchtitan-style job does in one optimizer step, in plain PyTorch:
  * model: token + position embeddings, --layers pre-norm MoE blocks (router nn.Linear(H, E, bias=False),
    softmax scores, top-k, --experts tiny experts, residual), a final norm and an LM head; the main loss
    is the next-token cross entropy over the real (unpadded) tokens;
  * data parallelism: DistributedDataParallel over the dp x cp ranks of each pipeline stage; gradient
    accumulation over --microbatches with no_sync() on all but the last;
  * context parallelism: every sequence sharded over the cp ranks (contiguous chunks, or zigzag as
    Megatron-LM's get_batch_on_this_cp_rank does), the aux statistics all-reduced over the cp group;
  * pipeline parallelism (--pp 2): the layers split between two stages that exchange activations and
    their gradients by send/recv, one microbatch at a time;
  * padding: every sequence has its own valid length; the aux statistics count only real tokens.
Ranks are ordered cp fastest, then dp, then pp (Megatron-LM's order): rank = (pp*dp_size + dp)*cp_size + cp.

Two ways to inject the aux-loss gradient (--injection):
  autoscaler  Megatron-LM / NeMo Automodel: MoEAuxLossAutoScaler.apply(routing_weights, aux) is the
              identity in forward; its backward hands the aux loss the gradient ones * a class-level
              scale that the training loop sets before every microbatch (set_loss_scale, as Megatron's
              schedules.forward_step_calc_loss does): cp/M, because the main loss is divided by M and
              DDP averages over dp x cp while each CP rank holds a partial aux loss. Probabilities stay
              local; counts and token totals are all-reduced over cp (Megatron's TopKRouter._apply_aux_loss).
              Objective: alpha x the mean over the (DP replica, microbatch) groups -> group_weighting uniform.
  identity    torchtitan: an identity-forward autograd.Function on the router scores whose backward adds
              the gradient of coeff * raw / denominator, raw = T_G * L(G) for each group, denominator =
              the step's global valid-token count; counts, token totals and probability sums all-reduced
              over cp with an identity backward (Partial -> Invariant); gradients summed over dp x cp
              instead of averaged (torchtitan calls disable_fsdp_gradient_division; here a DDP comm hook).
              Objective: sum_G (T_G / sum T) alpha L(G) -> group_weighting tokens.

--bug NAME reproduces a known bug in this job's own code. The expected `moe-lbcheck verify` outcome of
each is derived below (EXPECTED OUTCOMES) from this file's arithmetic.
--main-loss-scale must stay 0 for a capture (the capture helper refuses to save otherwise); without
--capture-dir the job just trains one step and --main-loss-scale 1 is the real training loss.
"""

# EXPECTED OUTCOMES, measured against alpha x the mean over groups of the declared objective.
#
# Notation: N = dp*cp ranks per pipeline stage (the DDP group), M microbatches, s the autoscaler's
# backward scale, G = (d, m) a micro_batch group, L(G) its balance loss, grad = d/dW of the router.
# On the cp ranks of replica d, microbatch m: counts and T_G are all-reduced over cp, the probabilities
# are local, so the ranks' aux losses are partials that sum to alpha*L(G) (L is linear in P once the
# counts are fixed: Megatron's switch_load_balancing_loss_func docstring), and the sum of their router
# gradients is s*alpha*grad L(G). DDP adds the M accumulated microbatches and averages over N:
#     g = (s / (dp*cp)) * alpha * sum_{d,m} grad L(G_dm) = (s * M / cp) * grad J,  J = alpha mean_G L(G).
# So s = cp/M gives g = grad J: the clean job passes. For --injection identity every cp rank holds
# raw = T_G L(G) (probability sums all-reduced, identity backward), its gradient is the local-token part,
# and the comm hook sums over N: g = alpha * sum_G T_G grad L(G) / sum T = grad J_tokens: passes.
#
#   discard_apply_return   (NeMo Automodel #1408, fixed by PR #1412) the return value of
#       MoEAuxLossAutoScaler.apply (or the identity injection) is discarded: the aux loss is not in the
#       graph, and the main loss is x 0, so g = 0 exactly                      -> AUX_GRAD_MISSING.
#   backward_scale_unset   (NeMo Automodel #1408) set_loss_scale is never called, s stays 1:
#       g = (1 * M / cp) grad J                                                 -> AUX_GRAD_SCALED M/cp.
#   missing_cp_scale       (Megatron-LM #1652, before PR #2237) s = 1/M instead of cp/M:
#       g = ((1/M) * M / cp) grad J = grad J / cp                               -> AUX_GRAD_SCALED 1/cp.
#   global_token_normalization   (Megatron-LM #3672; needs --aux-type global_batch, M = 1) Megatron's
#       _apply_global_aux_loss: counts all-reduced over dp x cp, T = the global valid-token count,
#       probabilities local, so the N ranks' partials sum to alpha*L(batch) and the ranks' gradients to
#       s*alpha*grad L; the clean job multiplies its partial by dp (the group spans dp x cp, the scale
#       s = cp/M compensates cp only), the bug does not:
#       g = (cp/M / (dp*cp)) * M * alpha grad L = grad J / dp                   -> AUX_GRAD_SCALED 1/dp.
#   count_padding          (Megatron-LM #1982 / #1984, fixed by PR #2121) the padding rows enter the
#       counts, T and the probability sums: the job differentiates another objective, whose gradient has
#       components along the padding rows' router inputs, which J does not   -> AUX_GRAD_DIRECTION.
#   world_size_multiply    (HF transformers #48690) the aux loss is multiplied by the world size, as the
#       HF Trainer does with average_tokens_across_devices to undo DDP's mean: g = world * grad J, and
#       with cp = pp = 1 world = dp                                             -> AUX_GRAD_SCALED dp.
#   autograd_allreduce_stats   (pytorch #58005; torchtitan's _PartialToInvariantAllReduce comment warns of
#       it; needs --injection identity, where the probability sums are all-reduced) the statistics are
#       all-reduced with torch.distributed.nn.all_reduce, whose backward all-reduces the gradient too:
#       every cp rank holds the same raw, so its local gradient becomes the sum of cp equal ones:
#       g = cp * grad J                                                         -> AUX_GRAD_SCALED cp.
#   skipped_allreduce_rank the highest rank (never the lowest of its stage: needs dp*cp >= 2) puts its own
#       un-reduced, accumulated router gradient back after DDP's reduction, as a rank that skipped the
#       all-reduce would hold it (done after the collective, so gloo does not deadlock). The lowest rank
#       of each stage keeps grad J; the ranks holding the same router now differ -> REPLICA_DIVERGENCE.

import argparse
import contextlib
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (torch.distributed.nn.all_reduce, for the autograd_allreduce_stats bug)
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "python"))
import moe_lbcheck_capture as lbc  # noqa: E402

PAD = 0
BUGS = ("discard_apply_return", "backward_scale_unset", "missing_cp_scale", "global_token_normalization",
        "count_padding", "world_size_multiply", "autograd_allreduce_stats", "skipped_allreduce_rank")


# -- aux-loss injection ----------------------------------------------------------------------------------

class MoEAuxLossAutoScaler(torch.autograd.Function):
    """Megatron-LM's megatron/core/transformer/moe/moe_utils.py MoEAuxLossAutoScaler (NeMo Automodel keeps a
    copy): identity on the routing weights in forward; in backward the aux loss gets ones * a class-level
    scale, so its gradient travels with the main loss's without being added to it."""

    main_loss_backward_scale = torch.tensor(1.0)

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        scale = MoEAuxLossAutoScaler.main_loss_backward_scale.to(aux_loss)
        return grad_output, torch.ones_like(aux_loss) * scale

    @staticmethod
    def set_loss_scale(scale):
        MoEAuxLossAutoScaler.main_loss_backward_scale = scale


class AuxLossInjection(torch.autograd.Function):
    """torchtitan's _AuxLossInjection: identity on the router scores; backward returns plain ones for the
    injected value (coeff * raw / denominator), i.e. adds its gradient to the scores'."""

    @staticmethod
    def forward(ctx, scores, injected):
        ctx.save_for_backward(injected)
        return scores

    @staticmethod
    def backward(ctx, grad_output):
        (injected,) = ctx.saved_tensors
        return grad_output, torch.ones_like(injected)


class _AllReduceIdentityBackward(torch.autograd.Function):
    """Sum over `group` in forward, identity in backward: Megatron-LM's reduce_from_tensor_model_parallel_region,
    torchtitan's Partial -> Invariant redistribute (_PartialToInvariantAllReduce)."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# -- the model -------------------------------------------------------------------------------------------

class RouterBatch(object):
    """What the MoE layers need to know about the rows of one microbatch, in the router's row order."""

    def __init__(self, valid, slot, slots):
        self.valid = valid      # [n] bool: a real token
        self.slot = slot        # [n] int64: the row's sequence within the microbatch (0 .. slots-1)
        self.slots = slots


class Expert(nn.Module):
    def __init__(self, hidden, ffn):
        super().__init__()
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


class TopKRouter(nn.Module):
    def __init__(self, hidden, experts):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)   # logits z = h W^T; the capture attaches here


class MoELayer(nn.Module):
    def __init__(self, index, cfg):
        super().__init__()
        self.index, self.cfg = index, cfg
        self.norm = nn.LayerNorm(cfg.hidden)
        self.router = TopKRouter(cfg.hidden, cfg.experts)
        self.experts = nn.ModuleList(Expert(cfg.hidden, cfg.ffn) for _ in range(cfg.experts))
        self.on_route = None   # callback(layer_index, topk_indices), set by the training loop

    def forward(self, x, batch):
        cfg = self.cfg
        h = self.norm(x)
        logits = self.router.gate(h).reshape(-1, cfg.experts)
        scores = torch.softmax(logits, dim=-1)
        topk_idx = torch.topk(scores.detach(), cfg.top_k, dim=-1).indices
        if self.on_route is not None:
            self.on_route(self.index, topk_idx)
        aux = cfg.aux_loss(scores, logits, topk_idx, batch)
        if cfg.injection == "identity":
            injected = AuxLossInjection.apply(scores, aux)
            if "discard_apply_return" not in cfg.bugs:
                scores = injected
        weights = scores.gather(1, topk_idx)
        if cfg.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if cfg.injection == "autoscaler":
            scaled = MoEAuxLossAutoScaler.apply(weights, aux)
            if "discard_apply_return" not in cfg.bugs:   # NeMo Automodel #1408 called apply() and dropped it
                weights = scaled
        flat = h.reshape(-1, cfg.hidden)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = (topk_idx == e).nonzero(as_tuple=True)
            out = out.index_add(0, rows, weights[rows, slot].unsqueeze(1) * expert(flat[rows]))
        return x + out.view_as(x)


class Stage(nn.Module):
    """One pipeline stage: the embeddings on the first, its share of the layers, the LM head on the last."""

    def __init__(self, cfg, embed, pos_embed, layers, final_norm, head):
        super().__init__()
        self.cfg = cfg
        self.embed, self.pos_embed = embed, pos_embed
        self.layers = nn.ModuleList(layers)
        self.final_norm, self.head = final_norm, head

    def forward(self, x, positions, batch, labels=None):
        if self.embed is not None:                            # x: token ids [B, S_local]
            h = self.embed(x) + self.pos_embed(positions).unsqueeze(0)
            if self.cfg.layout == "sb":
                h = h.transpose(0, 1).contiguous()            # Megatron-LM runs [S, B, H]
        else:
            h = x
        for layer in self.layers:
            h = layer(h, batch)
        if self.head is None:
            return h
        logits = self.head(self.final_norm(h))
        if self.cfg.layout == "sb":
            logits = logits.transpose(0, 1)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               reduction="sum")


# -- the aux loss ----------------------------------------------------------------------------------------

class Config(object):
    pass


def make_aux_loss(cfg, groups):
    """The aux (+ z) loss each MoE layer injects, as Megatron-LM's TopKRouter (autoscaler) or torchtitan's
    MicrobatchWiseLoadBalanceLoss (identity) computes it, with cfg.bugs applied."""
    E, k = cfg.experts, cfg.top_k

    def reduce_stat(t, group):      # counts and token totals: no gradient flows through them
        if "autograd_allreduce_stats" in cfg.bugs:
            return torch.distributed.nn.all_reduce(t, group=group)
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    def reduce_partial(t, group):   # probability sums: differentiable
        if "autograd_allreduce_stats" in cfg.bugs:
            return torch.distributed.nn.all_reduce(t, group=group)   # backward sums over the group too
        return _AllReduceIdentityBackward.apply(t, group)

    def aux_loss(scores, logits, topk_idx, batch):
        dtype = scores.dtype
        valid = batch.valid
        if "count_padding" in cfg.bugs:
            valid = torch.ones_like(valid)                       # before Megatron-LM PR #2121
        mask = valid.to(dtype).unsqueeze(1)
        routing = torch.zeros_like(scores).scatter_(1, topk_idx, 1.0)
        slots = batch.slots if cfg.aux_type == "sequence" else 1
        slot = batch.slot if cfg.aux_type == "sequence" else torch.zeros_like(batch.slot)
        onehot = F.one_hot(slot, slots).to(dtype).t()           # [groups, n]
        counts = onehot @ (routing * mask)                       # [groups, E]
        tokens = onehot @ mask                                   # [groups, 1]
        prob_sum = onehot @ (scores * mask)                      # [groups, E]
        stat_group = groups.stage if cfg.aux_type == "global_batch" else groups.cp
        counts, tokens = reduce_stat(counts, stat_group), reduce_stat(tokens, stat_group)
        z_sum = 0.0
        if cfg.z_loss_coeff:
            z_sum = (torch.logsumexp(logits, dim=-1) ** 2 * mask.squeeze(1)).sum()
        if cfg.injection == "autoscaler":
            # switch_load_balancing_loss_func: E / (k T^2) * sum_e N_e * sum_local p_e, a partial over cp
            # (over dp x cp for global_batch) that sums to L(G); the sequence variant divides by B.
            per_group = E / (k * tokens.squeeze(1) ** 2) * (counts * prob_sum).sum(dim=1)
            aux = cfg.aux_coeff * per_group.mean()
            if cfg.aux_type == "global_batch" and "global_token_normalization" not in cfg.bugs:
                # The partials now sum over dp x cp ranks, while the backward scale (cp/M) and DDP's
                # mean compensate only cp: x dp is what Megatron-LM's _apply_global_aux_loss lacks.
                aux = aux * cfg.dp
            if cfg.z_loss_coeff:
                # z-loss over the microbatch: Megatron's z_loss_func takes each rank's own token mean
                # / |tp_cp|; the local sum over the microbatch's total (all cp shards) is that mean's
                # exact share also when the shards hold different numbers of padding tokens.
                mb_tokens = reduce_stat(mask.sum().reshape(1), groups.cp)
                aux = aux + cfg.z_loss_coeff * z_sum / mb_tokens.squeeze(0)
        else:
            # torchtitan: f_e = E counts_e / sum counts, raw = sum_e f_e * sum_t s'_te = T_G * L(G)
            prob_sum = reduce_partial(prob_sum, groups.cp)
            raw = (E / (k * tokens.squeeze(1)) * (counts * prob_sum).sum(dim=1)).sum()
            aux = (cfg.aux_coeff * raw + cfg.z_loss_coeff * z_sum) / cfg.denominator
        if "world_size_multiply" in cfg.bugs:
            aux = aux * dist.get_world_size()                     # HF transformers #48690
        return aux

    return aux_loss


# -- data and sharding -----------------------------------------------------------------------------------

def global_batch(cfg):
    """The whole step's batch, identical on every rank: dp*M*mbs sequences with unequal valid lengths."""
    g = torch.Generator().manual_seed(cfg.seed + 1)
    n = cfg.dp * cfg.microbatches * cfg.mbs
    tokens = torch.randint(1, cfg.vocab, (n, cfg.seq_len + 1), generator=g)
    lengths = torch.randint(max(1, cfg.seq_len // 3), cfg.seq_len + 1, (n,), generator=g)
    lengths[0] = cfg.seq_len
    pos = torch.arange(cfg.seq_len + 1)
    tokens[pos.unsqueeze(0) >= lengths.unsqueeze(1)] = PAD
    inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    labels[(labels == PAD) | (inputs == PAD)] = -100             # no target at or after the padding
    return inputs, labels, lengths


def shard_for_cp(x, dim, cp_size, cp_rank, zigzag):
    """This cp rank's part of the sequence dimension: a contiguous chunk, or the zigzag pair of chunks
    (cp_rank, 2*cp_size-1-cp_rank) of Megatron-LM's get_batch_on_this_cp_rank."""
    if cp_size == 1:
        return x
    if not zigzag:
        return x.chunk(cp_size, dim=dim)[cp_rank]
    shape = list(x.shape)
    v = x.reshape(shape[:dim] + [2 * cp_size, shape[dim] // (2 * cp_size)] + shape[dim + 1:])
    v = v.index_select(dim, torch.tensor([cp_rank, 2 * cp_size - 1 - cp_rank]))
    return v.reshape(shape[:dim] + [-1] + shape[dim + 1:])


class Groups(object):
    pass


def build_groups(cfg):
    """Every rank creates every group, in the same order (torch.distributed.new_group is collective)."""
    g = Groups()
    per_stage = cfg.dp * cfg.cp
    for p in range(cfg.pp):
        grp = dist.new_group(list(range(p * per_stage, (p + 1) * per_stage)))
        if p == cfg.pp_rank:
            g.stage = grp
    for p in range(cfg.pp):
        for d in range(cfg.dp):
            base = (p * cfg.dp + d) * cfg.cp
            grp = dist.new_group(list(range(base, base + cfg.cp)))
            if (p, d) == (cfg.pp_rank, cfg.dp_rank):
                g.cp = grp
    return g


def sum_instead_of_mean(state, bucket):
    """DDP comm hook: all-reduce SUM without DDP's division by the group size (torchtitan's
    disable_fsdp_gradient_division / set_gradient_divide_factor(1.0))."""
    return dist.all_reduce(bucket.buffer(), group=state, async_op=True).get_future().then(
        lambda fut: fut.value()[0])


# -- the training step -----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dp", type=int, default=None, help="data-parallel size (default: world / (cp*pp))")
    p.add_argument("--cp", type=int, default=1, help="context-parallel size")
    p.add_argument("--pp", type=int, default=1, choices=(1, 2), help="pipeline stages")
    p.add_argument("--microbatches", type=int, default=2, help="gradient-accumulation microbatches M")
    p.add_argument("--micro-batch-size", dest="mbs", type=int, default=2, help="sequences per microbatch")
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--ffn", type=int, default=8)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=None, help="MoE layers (default 2, 4 with --pp 2)")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--aux-type", choices=("micro_batch", "sequence", "global_batch"), default="micro_batch")
    p.add_argument("--aux-coeff", type=float, default=1e-2, help="alpha")
    p.add_argument("--z-loss-coeff", type=float, default=0.0, help="beta (z-loss over each microbatch)")
    p.add_argument("--norm-topk-prob", action="store_true")
    p.add_argument("--injection", choices=("autoscaler", "identity"), default="autoscaler")
    p.add_argument("--cp-layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--layout", choices=("bs", "sb"), default="bs",
                   help="hidden states [B, S, H] (bs) or [S, B, H] (sb, Megatron-LM)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--bug", action="append", default=[], choices=BUGS, help="reproduce a known bug (repeatable)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--capture-dir", default=None, help="record the step as a moe-lbcheck capture here")
    p.add_argument("--no-record-topk", action="store_true", help="do not record the job's top-k choice")
    p.add_argument("--main-loss-scale", type=float, default=None,
                   help="multiplier of the main loss (default 0 with --capture-dir, else 1; a capture needs 0)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a collective gives up")
    return p.parse_args(argv)


def configure(args, rank, world):
    cfg = Config()
    for k, v in vars(args).items():
        setattr(cfg, k, v)
    cfg.bugs = set(args.bug)
    if cfg.dp is None:
        cfg.dp = world // (cfg.cp * cfg.pp)
    if cfg.dp * cfg.cp * cfg.pp != world:
        raise SystemExit("moe_ddp_job: dp*cp*pp = %d*%d*%d != world size %d" % (cfg.dp, cfg.cp, cfg.pp, world))
    if cfg.layers is None:
        cfg.layers = 2 * cfg.pp
    if cfg.layers % cfg.pp:
        raise SystemExit("moe_ddp_job: --layers %d is not divisible by --pp %d" % (cfg.layers, cfg.pp))
    chunks = 2 * cfg.cp if cfg.cp_layout == "zigzag" else cfg.cp
    if cfg.seq_len % chunks:
        raise SystemExit("moe_ddp_job: --seq-len %d is not divisible into %d chunks" % (cfg.seq_len, chunks))
    if cfg.main_loss_scale is None:
        cfg.main_loss_scale = 0.0 if cfg.capture_dir else 1.0
    cfg.pp_rank, rem = divmod(rank, cfg.dp * cfg.cp)
    cfg.dp_rank, cfg.cp_rank = divmod(rem, cfg.cp)
    cfg.dtype_t = getattr(torch, cfg.dtype)
    # Combinations the job does not implement, with the reason.
    if cfg.aux_type == "global_batch":
        if cfg.microbatches != 1:
            raise SystemExit("moe_ddp_job: --aux-type global_batch needs --microbatches 1: counts of later "
                             "microbatches are unknown when the first runs backward (torchtitan PR #3000 "
                             "rejects batch-wise aux under accumulation for this reason)")
        if cfg.injection != "autoscaler":
            raise SystemExit("moe_ddp_job: --aux-type global_batch is implemented for --injection autoscaler")
    autoscaler_only = {"backward_scale_unset", "missing_cp_scale", "global_token_normalization"}
    if cfg.injection != "autoscaler" and cfg.bugs & autoscaler_only:
        raise SystemExit("moe_ddp_job: --bug %s needs --injection autoscaler (it is about its backward scale)"
                         % ",".join(sorted(cfg.bugs & autoscaler_only)))
    if "global_token_normalization" in cfg.bugs and cfg.aux_type != "global_batch":
        raise SystemExit("moe_ddp_job: --bug global_token_normalization needs --aux-type global_batch")
    if "autograd_allreduce_stats" in cfg.bugs and cfg.injection != "identity":
        raise SystemExit("moe_ddp_job: --bug autograd_allreduce_stats needs --injection identity: with the "
                         "autoscaler only counts are all-reduced, and they carry no gradient to multiply")
    if "skipped_allreduce_rank" in cfg.bugs and cfg.dp * cfg.cp < 2:
        raise SystemExit("moe_ddp_job: --bug skipped_allreduce_rank needs dp*cp >= 2")
    return cfg


def build_stage(cfg):
    """The full model from one seed on every rank (identical replicas); this rank keeps its stage's part."""
    torch.manual_seed(cfg.seed)
    embed = nn.Embedding(cfg.vocab, cfg.hidden)
    pos_embed = nn.Embedding(cfg.seq_len, cfg.hidden)
    layers = [MoELayer(i, cfg) for i in range(cfg.layers)]
    final_norm, head = nn.LayerNorm(cfg.hidden), nn.Linear(cfg.hidden, cfg.vocab, bias=False)
    per = cfg.layers // cfg.pp
    first, last = cfg.pp_rank == 0, cfg.pp_rank == cfg.pp - 1
    stage = Stage(cfg, embed if first else None, pos_embed if first else None,
                  layers[cfg.pp_rank * per:(cfg.pp_rank + 1) * per],
                  final_norm if last else None, head if last else None)
    return stage.to(cfg.dtype_t)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = configure(args, rank, world)
    groups = build_groups(cfg)
    cfg.aux_loss = make_aux_loss(cfg, groups)
    t0 = time.time()

    stage = build_stage(cfg)
    ddp = DDP(stage, process_group=groups.stage)
    if cfg.injection == "identity":
        ddp.register_comm_hook(groups.stage, sum_instead_of_mean)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=cfg.lr)

    # This rank's data: replica dp_rank's share of the global batch, its cp shard of every sequence.
    inputs, labels, lengths = global_batch(cfg)
    positions = shard_for_cp(torch.arange(cfg.seq_len), 0, cfg.cp, cfg.cp_rank, cfg.cp_layout == "zigzag")
    M, mbs = cfg.microbatches, cfg.mbs

    def microbatch_rows(m):
        first = (cfg.dp_rank * M + m) * mbs
        sl = slice(first, first + mbs)
        x = shard_for_cp(inputs[sl], 1, cfg.cp, cfg.cp_rank, cfg.cp_layout == "zigzag")
        y = shard_for_cp(labels[sl], 1, cfg.cp, cfg.cp_rank, cfg.cp_layout == "zigzag")
        valid = x != PAD                                                   # [mbs, S_local]
        slot = torch.arange(mbs).unsqueeze(1).expand_as(valid)
        if cfg.layout == "sb":
            valid, slot = valid.t(), slot.t()
        return x, y, RouterBatch(valid.reshape(-1), slot.reshape(-1).contiguous(), mbs), list(range(first, first + mbs))

    # Valid tokens of the step over all replicas (torchtitan's global_valid_tokens).
    local_valid = torch.tensor([float(sum(int((microbatch_rows(m)[0] != PAD).sum()) for m in range(M)))])
    dist.all_reduce(local_valid, group=groups.stage)
    cfg.denominator = float(local_valid.item())

    cap = None
    if cfg.capture_dir:
        cap = lbc.Capture(
            cfg.capture_dir, rank=rank, world_size=world, seq_len=cfg.seq_len,
            mesh=dict(dp=cfg.dp_rank, dp_size=cfg.dp, cp=cfg.cp_rank, cp_size=cfg.cp, pp=cfg.pp_rank,
                      pp_size=cfg.pp, microbatches=M),
            objective=dict(aux_type=cfg.aux_type, coeff=cfg.aux_coeff, z_loss_coeff=cfg.z_loss_coeff,
                           z_loss_scope="micro_batch", top_k=cfg.top_k, score="softmax",
                           norm_topk_prob=cfg.norm_topk_prob, exclude_padding=True,
                           group_weighting="tokens" if cfg.injection == "identity" else "uniform",
                           compute_dtype=cfg.dtype),
            framework="examples/moe_ddp_job.py (%s injection%s), torch %s" % (
                cfg.injection, "; bug " + ",".join(sorted(cfg.bugs)) if cfg.bugs else "", torch.__version__),
            main_loss_scale=cfg.main_loss_scale)
        for layer in stage.layers:
            cap.attach(layer.index, layer.router.gate)
            if not cfg.no_record_topk:
                layer.on_route = cap.record_topk

    # skipped_allreduce_rank: the highest rank keeps its own accumulated router gradient on the side.
    skip_local = {}
    if "skipped_allreduce_rank" in cfg.bugs and rank == world - 1:
        for layer in stage.layers:
            w = layer.router.gate.weight
            skip_local[w] = torch.zeros_like(w)
            def keep(grad, acc=skip_local[w]):
                acc.add_(grad)
            w.register_hook(keep)

    prev_rank = rank - cfg.dp * cfg.cp if cfg.pp_rank > 0 else None
    next_rank = rank + cfg.dp * cfg.cp if cfg.pp_rank < cfg.pp - 1 else None
    s_local = positions.numel()
    act_shape = (mbs, s_local, cfg.hidden) if cfg.layout == "bs" else (s_local, mbs, cfg.hidden)
    for m in range(M):
        # Megatron-LM schedules.forward_step_calc_loss sets the scale on every stage, every microbatch.
        if cfg.injection == "autoscaler" and "backward_scale_unset" not in cfg.bugs:
            scale = (1.0 if "missing_cp_scale" in cfg.bugs else cfg.cp) / M   # 1/M: before PR #2237
            MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale))
        x, y, batch, seqs = microbatch_rows(m)
        sync = m == M - 1
        record = contextlib.nullcontext()
        if cap is not None:
            sequence, position, valid = lbc.token_ids(seqs, lbc.cp_positions(
                cfg.seq_len, cfg.cp, cfg.cp_rank, zigzag=cfg.cp_layout == "zigzag"), lengths[seqs], cfg.layout)
            record = cap.microbatch(m, sequence=sequence, position=position, valid=valid)
        with record, (contextlib.nullcontext() if sync else ddp.no_sync()):
            if prev_rank is None:
                stage_in = x
            else:
                stage_in = torch.empty(act_shape, dtype=cfg.dtype_t)
                dist.recv(stage_in, src=prev_rank)
                stage_in.requires_grad_()
            out = ddp(stage_in, positions, batch, y)
            if next_rank is not None:
                dist.send(out.detach().contiguous(), dst=next_rank)
                grad = torch.empty_like(out)
                dist.recv(grad, src=next_rank)
                torch.autograd.backward(out, grad)
            else:
                # The main loss: Megatron divides each microbatch by its tokens, x cp, / M (DDP then
                # averages over dp x cp); torchtitan divides by the step's global tokens (DDP sums).
                if cfg.injection == "autoscaler":
                    mb_tokens = (y != -100).sum().to(cfg.dtype_t).reshape(1)
                    dist.all_reduce(mb_tokens, group=groups.cp)
                    loss = out / mb_tokens.squeeze(0) * cfg.cp / M
                else:
                    loss = out / cfg.denominator
                (loss * cfg.main_loss_scale).backward()
            if prev_rank is not None:
                dist.send(stage_in.grad.contiguous(), dst=prev_rank)

    for w, local in skip_local.items():
        w.grad.copy_(local)     # the un-reduced gradient, as if this rank had skipped the all-reduce

    path = cap.save() if cap is not None else None   # after the gradient sync, before the optimizer step
    optimizer.step()
    optimizer.zero_grad()
    dist.barrier()
    if rank == 0:
        print("moe_ddp_job: dp=%d cp=%d pp=%d M=%d mbs=%d layers=%d injection=%s aux=%s bugs=%s: step in %.2f s%s"
              % (cfg.dp, cfg.cp, cfg.pp, M, mbs, cfg.layers, cfg.injection, cfg.aux_type,
                 ",".join(sorted(cfg.bugs)) or "none", time.time() - t0,
                 "; capture in " + os.path.dirname(path) if path else ""), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except lbc.CaptureError as e:
        print("moe_ddp_job: rank %s: %s" % (os.environ.get("RANK", "?"), e), file=sys.stderr, flush=True)
        sys.exit(1)
