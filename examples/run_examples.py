#!/usr/bin/env python3
"""Run the example training jobs under torchrun and check each capture with `moe-lbcheck verify`.

    examples/run_examples.py --cli build/moe-lbcheck           # or MOE_LBCHECK=build/moe-lbcheck
    examples/run_examples.py --capture-only                    # no verify binary: check the captures here
    examples/run_examples.py --list | --cases REGEX | --keep DIR

Each case launches examples/moe_ddp_job.py with torchrun on loopback (gloo, 2-4 ranks) into a fresh
temporary capture directory, then runs
    MOE_LBCHECK verify DIR --expect verdict=...,diagnosis=...,factor=...
and requires exit 0 (the outcome matched). Every capture is also read back with an independent reader
(capture_check.py: all rank files present, manifests consistent, the tensors of the format), and
checked against a float64 autograd reference of the declared objective: the measured scale must equal
the case's factor evaluated on its mesh, which confirms the hand derivation in moe_ddp_job.py without
reading anything back from the tool. One line per case, an OK/FAILED footer, exit 1 on any failure,
77 (CTest's skip code) when torch or torchrun is missing.
"""

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
JOB = os.path.join(HERE, "moe_ddp_job.py")
SKIP = 77


class Case(object):
    def __init__(self, name, nproc, args, expect, why):
        self.name, self.nproc, self.args, self.why = name, nproc, args, why
        self.expect = dict(item.split("=", 1) for item in expect.split(","))

    def mesh(self):
        """The mesh quantities a factor is written in, from the job arguments."""
        a = self.args
        get = lambda flag, default: int(a[a.index(flag) + 1]) if flag in a else default  # noqa: E731
        cp, pp = get("--cp", 1), get("--pp", 1)
        dp = get("--dp", self.nproc // (cp * pp))
        return {"dp": dp, "cp": cp, "pp": pp, "M": get("--microbatches", 2), "mbs": get("--micro-batch-size", 2),
                "world": self.nproc, "tp": 1, "ep": 1}


# Factor names are those verify attributes a scale to: dp, cp, pp, tp, ep, M, mbs, tokens, world. Each
# case's mesh keeps the expected factor's value apart from every single mesh quantity that verify lists
# before it (dp, cp, M, pp, mbs, ...); a single-dimension layout leaves dp*cp*pp = world, listed last.
# The derivations are spelled out in moe_ddp_job.py (EXPECTED OUTCOMES); g = the router gradient,
# grad J = the declared objective's.
CASES = [
    Case("clean-autoscaler-dp2-cp2-zigzag-sb-zloss", 4,
         ["--dp", "2", "--cp", "2", "--microbatches", "2", "--cp-layout", "zigzag", "--layout", "sb",
          "--z-loss-coeff", "1e-3"],
         "verdict=pass", "scale cp/M under a DDP mean over dp*cp: g = (cp/M)*M/cp grad J"),
    Case("clean-autoscaler-dp2-pp2-M3", 4, ["--dp", "2", "--pp", "2", "--microbatches", "3"],
         "verdict=pass", "each stage injects locally with cp/M = 1/3; DDP per stage over dp: g = grad J"),
    Case("clean-autoscaler-dp4-M3", 4, ["--dp", "4", "--microbatches", "3", "--micro-batch-size", "1"],
         "verdict=pass", "g = (1/3)/4 * sum of 12 groups = mean"),
    Case("clean-identity-cp2-pp2-zloss", 4,
         ["--cp", "2", "--pp", "2", "--microbatches", "2", "--injection", "identity", "--z-loss-coeff", "1e-3"],
         "verdict=pass", "raw/global tokens, DDP sum: g = sum_G T_G grad L(G) / sum T (group_weighting tokens)"),
    Case("clean-identity-dp2-sequence-normtopk", 2,
         ["--dp", "2", "--microbatches", "3", "--injection", "identity", "--aux-type", "sequence",
          "--norm-topk-prob"],
         "verdict=pass", "per-sequence raw T_b L_b / sum T, summed: token-weighted sequences"),
    Case("clean-autoscaler-global-dp2", 2,
         ["--dp", "2", "--microbatches", "1", "--aux-type", "global_batch", "--micro-batch-size", "3"],
         "verdict=pass", "partial over dp*cp x dp, scale cp/M, DDP mean over dp*cp: g = grad J"),
    # float64 and no recorded top-k: verify routes by the top-k of the recorded scores itself.
    Case("clean-autoscaler-cp2-sequence-f64-notopk", 2,
         ["--cp", "2", "--microbatches", "2", "--aux-type", "sequence", "--dtype", "float64", "--no-record-topk"],
         "verdict=pass", "mean over the microbatch's sequences, cp/M, DDP mean: mean over sequences"),
    Case("bug-discard_apply_return", 2, ["--dp", "2", "--microbatches", "2", "--bug", "discard_apply_return"],
         "verdict=fail,diagnosis=AUX_GRAD_MISSING", "aux not in the graph, main loss x 0: g = 0"),
    Case("bug-backward_scale_unset", 2,
         ["--cp", "2", "--microbatches", "3", "--micro-batch-size", "1", "--bug", "backward_scale_unset"],
         "verdict=fail,diagnosis=AUX_GRAD_SCALED,factor=M/cp", "s = 1: g = (1*M/cp) grad J = 1.5 grad J"),
    Case("bug-missing_cp_scale", 2,
         ["--cp", "2", "--microbatches", "3", "--micro-batch-size", "1", "--bug", "missing_cp_scale"],
         "verdict=fail,diagnosis=AUX_GRAD_SCALED,factor=1/cp", "s = 1/M: g = ((1/M)*M/cp) grad J = grad J / 2"),
    Case("bug-global_token_normalization", 2,
         ["--dp", "2", "--microbatches", "1", "--aux-type", "global_batch", "--micro-batch-size", "3",
          "--bug", "global_token_normalization"],
         "verdict=fail,diagnosis=AUX_GRAD_SCALED,factor=1/dp", "partials over dp*cp, no x dp: g = grad J / dp"),
    Case("bug-count_padding", 2, ["--dp", "2", "--microbatches", "2", "--bug", "count_padding"],
         "verdict=fail,diagnosis=AUX_GRAD_DIRECTION", "padding rows enter f, P and T: another objective"),
    Case("bug-world_size_multiply", 2,
         ["--dp", "2", "--microbatches", "3", "--micro-batch-size", "1", "--bug", "world_size_multiply"],
         "verdict=fail,diagnosis=AUX_GRAD_SCALED,factor=dp", "aux x world, world = dp here: g = dp grad J"),
    Case("bug-autograd_allreduce_stats", 2,
         ["--cp", "2", "--microbatches", "3", "--micro-batch-size", "1", "--injection", "identity",
          "--bug", "autograd_allreduce_stats"],
         "verdict=fail,diagnosis=AUX_GRAD_SCALED,factor=cp", "backward all-reduces cp equal gradients: g = cp grad J"),
    Case("bug-skipped_allreduce_rank", 2, ["--dp", "2", "--microbatches", "2", "--bug", "skipped_allreduce_rank"],
         "verdict=fail,diagnosis=REPLICA_DIVERGENCE", "rank 1 keeps its local gradient, rank 0 the reduced one"),
]


def factor_value(expr, mesh):
    """Evaluates "M/cp", "1/(dp*cp)", "dp*cp", "0" on the mesh quantities."""
    if not re.match(r"^[0-9A-Za-z_*/() ]+$", expr):
        raise ValueError("bad factor %r" % expr)
    names = dict(mesh)
    return float(eval(re.sub(r"[A-Za-z_]+", lambda m: "names[%r]" % m.group(0), expr), {"names": names}))


def find_torchrun(explicit):
    for path in ([explicit] if explicit else []) + ["/usr/bin/torchrun", shutil.which("torchrun") or ""]:
        if path and os.path.exists(path):
            return path
    return None


def launch(torchrun, case, directory, timeout):
    """torchrun on loopback; (returncode, seconds, output). The launcher and its workers run in a session
    of their own, so a hang is ended with the whole process group and nothing is left behind."""
    # torch 1.13's launcher under Python 3.11 fails unless --redirects/--tee are given a value its Std
    # enum can iterate (1 or 2; 0 and 3 map to None there): stdout goes to per-rank logs and is teed.
    # Static rendezvous on a port the OS just handed out (--standalone would always take 29400, and two
    # suites or a CTest -j run would then share a store).
    cmd = [torchrun, "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--nproc_per_node", str(case.nproc), "--monitor_interval", "0.1",
           "--redirects", "1", "--tee", "1", JOB] + case.args + ["--capture-dir", directory,
                                                                   "--timeout", str(int(timeout))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            universal_newlines=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        out, rc = "", None
        _kill_group(proc)
        out = (proc.communicate()[0] or "") + "\n[timed out after %d s]" % timeout
    _kill_group(proc)
    return rc, time.time() - t0, out


def free_port():
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_group(proc):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)


def self_check_case(case, directory):
    """Reads the capture independently and compares the job's gradient with the expectation. Returns
    (ok, one-line summary)."""
    import capture_check as cc
    cap = cc.load_capture(directory)
    res = cc.self_check(cap)
    mesh = case.mesh()
    want = case.expect
    diag = want.get("diagnosis")
    scales = [r["scale"] for r in res.values()]
    cosines = [r["cosine"] for r in res.values()]
    ratios = [r["norm_ratio"] for r in res.values()]
    diverging = sorted({d for r in res.values() for d in r["diverging_ranks"]})
    rel = max(r["max_rel_err"] for r in res.values())
    summary = "scale %s cos>=%.7f" % ("/".join("%.6g" % s for s in scales), min(cosines))
    tol = 1e-4  # float32 job against a float64 reference
    if want["verdict"] == "pass":
        ok = all(abs(s - 1) < tol for s in scales) and min(cosines) > 1 - 1e-8 and not diverging
        summary += " max_rel_err %.1e" % rel
    elif diag == "AUX_GRAD_MISSING":
        ok = all(r == 0 for r in ratios)
        summary = "|g|/|ref| %s" % "/".join("%.3g" % r for r in ratios)
    elif diag == "AUX_GRAD_SCALED":
        v = factor_value(want["factor"], mesh)
        ok = all(abs(s - v) < tol * v for s in scales) and min(cosines) > 1 - 1e-8 and not diverging
        summary += " = %s = %.6g" % (want["factor"], v)
    elif diag == "AUX_GRAD_DIRECTION":
        ok = min(cosines) < 1 - 1e-3
    elif diag == "REPLICA_DIVERGENCE":
        ok = bool(diverging) and all(abs(s - 1) < tol for s in scales)
        summary += " diverging ranks %s" % diverging
    else:
        ok, summary = False, "no self-check for %s" % diag
    return ok, summary


def main(argv=None):
    p = argparse.ArgumentParser(description="run the example jobs and verify their captures")
    p.add_argument("--cli", default=os.environ.get("MOE_LBCHECK"), help="the moe-lbcheck binary (env MOE_LBCHECK)")
    p.add_argument("--capture-only", action="store_true",
                   help="run the jobs and check the captures here, without moe-lbcheck verify")
    p.add_argument("--no-self-check", action="store_true", help="skip the float64 self-check of each capture")
    p.add_argument("--cases", default=None, help="run only the cases whose name matches this regex")
    p.add_argument("--list", action="store_true", help="list the cases with their expectation and exit")
    p.add_argument("--keep", default=None, help="keep the captures under this directory")
    p.add_argument("--torchrun", default=None, help="torchrun to launch with (default /usr/bin/torchrun)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per job launch (4 ranks take 7-12 s on 2 cores)")
    p.add_argument("--verify-timeout", type=float, default=60.0, help="seconds per verify")
    args = p.parse_args(argv)

    cases = [c for c in CASES if not args.cases or re.search(args.cases, c.name)]
    if args.list:
        for c in cases:
            print("%-42s %d ranks  %-58s %s" % (c.name, c.nproc, ",".join("%s=%s" % kv for kv in c.expect.items()),
                                              c.why))
        return 0
    if not cases:
        print("run_examples: no case matches %r" % args.cases)
        return 2
    if not args.capture_only and not args.cli:
        print("run_examples: give --cli PATH or MOE_LBCHECK, or --capture-only")
        return 2
    if args.cli and not args.capture_only and not os.access(args.cli, os.X_OK):
        print("run_examples: %s is not an executable" % args.cli)
        return 2
    torchrun = find_torchrun(args.torchrun)
    if torchrun is None:
        print("run_examples: SKIP: torchrun not found (apt-get install python3-torch)")
        return SKIP
    probe = subprocess.run([sys.executable, "-c", "import torch.distributed"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    if probe.returncode != 0:
        print("run_examples: SKIP: %s cannot import torch.distributed" % sys.executable)
        return SKIP
    sys.path.insert(0, HERE)

    root = args.keep or tempfile.mkdtemp(prefix="moe-lbcheck-examples-")
    failures, t_all = [], time.time()
    print("run_examples: %d cases, %s, torchrun %s" % (
        len(cases), "capture-only" if args.capture_only else "verify with " + args.cli, torchrun), flush=True)
    for case in cases:
        directory = os.path.join(root, case.name)
        shutil.rmtree(directory, ignore_errors=True)   # a fresh capture directory per case
        rc, seconds, out = launch(torchrun, case, directory, args.timeout)
        notes, ok = [], rc == 0
        t_verify = 0.0
        if not ok:
            notes.append("job exit %s" % rc)
        if ok and not args.no_self_check:
            try:
                good, summary = self_check_case(case, directory)
            except Exception as e:  # noqa: BLE001  (a broken capture is this case's failure, not the driver's)
                good, summary = False, "capture invalid: %s" % e
            ok = ok and good
            notes.append(("" if good else "SELF-CHECK FAILED: ") + summary)
        if rc == 0 and not args.capture_only:
            expect = ",".join("%s=%s" % kv for kv in case.expect.items())
            cmd = [args.cli, "verify", directory, "--expect", expect, "-q",
                   "--report", directory + ".report.json"]
            t1 = time.time()
            try:
                v = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                                   timeout=args.verify_timeout)
                vrc, vout = v.returncode, v.stdout
            except subprocess.TimeoutExpired:
                vrc, vout = None, "[verify timed out]"
            t_verify = time.time() - t1
            if vrc != 0:
                ok = False
                notes.append("verify exit %s" % vrc)
                out += "\n$ " + " ".join(cmd) + "\n" + vout
        print("%-6s %-42s %d ranks  job %5.1f s%s  %s" % (
            "ok" if ok else "FAILED", case.name, case.nproc, seconds,
            "  verify %4.1f s" % t_verify if not args.capture_only else "", "; ".join(notes)), flush=True)
        if not ok:
            failures.append(case.name)
            tail = "\n".join(out.strip().splitlines()[-40:])
            print("       " + tail.replace("\n", "\n       "), flush=True)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    total = time.time() - t_all
    if failures:
        print("FAILED: %d of %d cases (%s) in %.0f s" % (len(failures), len(cases), ", ".join(failures), total))
        return 1
    print("OK: %d cases in %.0f s" % (len(cases), total))
    return 0


if __name__ == "__main__":
    sys.exit(main())
