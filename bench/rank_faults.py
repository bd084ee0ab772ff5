#!/usr/bin/python3
"""How long moe-lbcheck takes to notice each kind of rank fault and to end every process.

Runs `moe-lbcheck run` on a 4-rank gloo mesh (quickstart.json at dp=2, pp=2, M=2) once per fault,
injected with the tool's test hooks (src/sim/test_hooks.hpp) at a known moment, and measures the
time from the hook's line on stderr to the launcher's exit, the exit code, and whether any process
carrying the run's token was left behind. Interrupts are measured the same way, from the signal sent
to the exit. Prints a Markdown table (docs/rank-faults.md records one).

    bench/rank_faults.py [--cli build/moe-lbcheck] [--timeout-s 5] [--repeat 1]
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCENARIO = os.path.join(HERE, "..", "scenarios", "quickstart.json")

FAULTS = [
    # (name, environment, what is expected)
    ("rank 2 exits (code 9)", {"MOE_LBCHECK_TEST_EXIT_RANK": "2"}, 3),
    ("rank 1 aborts (SIGABRT)", {"MOE_LBCHECK_TEST_CRASH_RANK": "1"}, 3),
    ("rank 1 segfaults (SIGSEGV)", {"MOE_LBCHECK_TEST_SEGV_RANK": "1"}, 3),
    ("rank 2 is killed (SIGKILL)", {"MOE_LBCHECK_TEST_KILL_RANK": "2"}, 3),
    ("rank 0 exits (code 9)", {"MOE_LBCHECK_TEST_EXIT_RANK": "0"}, 3),
    ("rank 3 hangs in a collective", {"MOE_LBCHECK_TEST_HANG_RANK": "3"}, 3),
    ("rank 0 stuck outside a collective", {"MOE_LBCHECK_TEST_STALL_RANK0": "1"}, 3),
]
INTERRUPTS = [("SIGINT to the launcher", signal.SIGINT, 130), ("SIGTERM to the launcher", signal.SIGTERM, 143)]


def leftovers(token):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"MOE_LBCHECK_TEST_TOKEN={token}".encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def run_once(cli, env_extra, timeout_s, interrupt=None):
    token = f"rank-faults-{os.getpid()}-{time.monotonic_ns()}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(env_extra)
    env["MOE_LBCHECK_TIMEOUT_S"] = str(timeout_s)
    env["MOE_LBCHECK_TEST_TOKEN"] = token
    with tempfile.TemporaryDirectory() as work:
        args = [cli, "run", SCENARIO, "--backend", "gloo", "--mesh", "dp=2,pp=2,mb=2", "--report",
                os.path.join(work, "r.json")]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        injected = [None]
        reported = [None]
        lines = []

        def read():
            for line in proc.stderr:
                lines.append(line)
                if reported[0] is None and injected[0] is not None and "error: gloo rank" in line:
                    reported[0] = time.monotonic()
                if injected[0] is None and "test hook:" in line:
                    injected[0] = time.monotonic()
                    if interrupt is not None:
                        proc.send_signal(interrupt)

        reader = threading.Thread(target=read)
        reader.start()
        code = proc.wait()
        ended = time.monotonic()
        reader.join()
        wrote = os.path.exists(os.path.join(work, "r.json"))
    left = leftovers(token)
    nan = float("nan")
    detection = reported[0] - injected[0] if reported[0] is not None and injected[0] is not None else nan
    to_exit = ended - injected[0] if injected[0] is not None else nan
    return detection, to_exit, code, left, wrote


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cli", default=os.path.join(HERE, "..", "build", "moe-lbcheck"))
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1)
    a = parser.parse_args()
    print(f"4 ranks (gloo, local launcher), MOE_LBCHECK_TIMEOUT_S={a.timeout_s:g}, "
          f"MOE_LBCHECK_KILL_GRACE_S default (5); load average {os.getloadavg()[0]:.1f}\n")
    print("| fault | first rank reports it (s) | every process ended (s) | exit code | outcome |")
    print("|---|---:|---:|---:|---|")
    ok = True
    cases = [(n, e, c, None) for n, e, c in FAULTS] + \
            [(n, {"MOE_LBCHECK_TEST_SLOW_RANK0_S": "600"}, c, s) for n, s, c in INTERRUPTS]
    for name, env, expected, sig in cases:
        times, exits = [], []
        for _ in range(a.repeat):
            t, e, code, left, wrote = run_once(a.cli, env, a.timeout_s, sig)
            times.append(t)
            exits.append(e)
            good = code == expected and not left and not wrote
            ok &= good
            outcome = ("every process ended, no report" if good else
                       f"UNEXPECTED: exit {code}, {len(left)} processes left, report written={wrote}")
        reported = ", ".join("-" if t != t else f"{t:.2f}" for t in times)
        ended = ", ".join(f"{t:.2f}" for t in exits)
        print(f"| {name} | {reported} | {ended} | {code} | {outcome} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
