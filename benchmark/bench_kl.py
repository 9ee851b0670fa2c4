"""Benchmark: exact per-token reverse KL + student token log-probs, forward + backward.

Methods (same inputs for all: final hidden states and lm_head weights of both models):
  naive          full logits h @ W.T for both models, float32 log_softmax, KL and log-probs by plain autograd
  from-hidden    kl_from_hidden: a chunk of positions at a time, full logits never materialised

Every (method, tokens) cell runs in a fresh subprocess so one method's allocator state cannot hide or
inflate another's. Peak EXTRA memory = peak above the state right after the inputs were created
(gradients of student hidden/weight count as extra for every method):
  CPU : kernel RSS high-water mark, VmHWM in /proc/self/status, reset by writing "5" to /proc/self/clear_refs
        before each run (falls back to a thread sampling /proc/self/statm every 0.5 ms if that is not allowed);
        reported as the max over all runs, the first (cold) one included.
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats; time from CUDA events.
Time: median over --repeats runs after one warm-up run. float32 on CPU, bf16 on CUDA.

Full size (do not run on a shared small machine):  python benchmark/bench_kl.py
Quick check:  python benchmark/bench_kl.py --tokens 128 256 --vocab 8192 --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, after PYTHONPATH
from common import kl_from_hidden  # noqa: E402

METHODS = ("naive", "from-hidden")
GIB, MIB = 2**30, 2**20


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="token counts (default: 512 2048 8192 on CPU, plus 16384 on CUDA)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs after the warm-up (median reported)")
    p.add_argument("--vocab", type=int, default=151_936, help="student lm_head rows (Qwen2.5-1.5B)")
    p.add_argument(
        "--teacher-extra-vocab",
        type=int,
        default=128,
        help="extra teacher rows (Qwen2.5-7B has 152,064 = 151,936 + 128)",
    )
    p.add_argument("--student-hidden", type=int, default=1536)
    p.add_argument("--teacher-hidden", type=int, default=3584)
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=None,
        help="skip a cell whose estimated total (inputs + extra) exceeds this "
        "(default: 16 on CPU, 90%% of GPU memory on CUDA)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    if args.tokens is None:
        args.tokens = [512, 2048, 8192] + ([16384] if cuda else [])
    if args.mem_limit_gib is None:
        args.mem_limit_gib = 0.9 * torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 16.0
    return args


def dtype_for(device):
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def estimate_bytes(method, t, a):
    """Rough total footprint (inputs + extra) of one cell, to skip cells that cannot fit."""
    b = dtype_for(a.device).itemsize
    vs, vt, c = a.vocab, a.vocab + a.teacher_extra_vocab, min(a.chunk_size, t)
    inputs = (t * (a.student_hidden + a.teacher_hidden) + vs * a.student_hidden + vt * a.teacher_hidden) * b
    grads = (t + vs) * a.student_hidden * b
    if method == "naive":  # both logits + ~7 float32 (T, V) tensors alive around the backward
        extra = t * (vs + vt) * b + 7 * t * vs * 4
    else:  # chunk temps, float32 weight-grad accumulator (+ bf16 product and cast when not float32)
        extra = 8 * c * vt * 4 + vs * a.student_hidden * (4 + (2 * b if b != 4 else 0))
    return inputs + grads + extra


class PeakRSS:
    """Peak resident memory above the level at start(), from the kernel's own accounting."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.hwm = True
        except OSError:
            self.hwm = False

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def start(self):
        if self.hwm:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS:")
        else:
            self.base = self.peak = self._rss()
            self.stop_flag = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()

    def _sample(self):
        while not self.stop_flag:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def stop(self):
        if self.hwm:
            return self._status("VmHWM:") - self.base
        self.stop_flag = True
        self.thread.join()
        return max(self.peak, self._rss()) - self.base


def naive(hs, ws, ht, wt, y, chunk):
    zs = hs @ ws.T
    with torch.no_grad():
        zt = ht @ wt.T
    v = min(zs.shape[-1], zt.shape[-1])
    ls, lt = F.log_softmax(zs[:, :v].float(), -1), F.log_softmax(zt[:, :v].float(), -1)
    return (ls.exp() * (ls - lt)).sum(-1), ls.gather(-1, y[:, None])[:, 0]


def from_hidden(hs, ws, ht, wt, y, chunk):
    kl, lp = kl_from_hidden(hs, ws, ht, wt, y, chunk)
    return kl, lp


def run_cell(a):
    method, t = a.cell, a.tokens[0]
    if a.threads:
        torch.set_num_threads(a.threads)
    dev, dt = torch.device(a.device), dtype_for(a.device)
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    vt = a.vocab + a.teacher_extra_vocab

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=dev, dtype=dt) * scale

    # post-norm hidden ~ N(0, 1); weight scale gives logits with std ~2, like a real LM head
    hs = rand(t, a.student_hidden).requires_grad_()
    ws = rand(a.vocab, a.student_hidden, scale=2 / a.student_hidden**0.5).requires_grad_()
    ht, wt = rand(t, a.teacher_hidden), rand(vt, a.teacher_hidden, scale=2 / a.teacher_hidden**0.5)
    y = torch.randint(0, min(a.vocab, vt), (t,), generator=g, device=dev)
    fn = {"naive": naive, "from-hidden": from_hidden}[method]
    meter = None if cuda else PeakRSS()
    peaks, times = [], []
    for i in range(1 + a.repeats):  # run 0 is the warm-up: its memory counts, its time does not
        hs.grad = ws.grad = None
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            meter.start()
            t0 = time.perf_counter()
        kl, lp = fn(hs, ws, ht, wt, y, a.chunk_size)
        (kl.sum() + lp.sum()).backward()
        del kl, lp
        if cuda:
            end.record()
            torch.cuda.synchronize()
            ms, peak = start.elapsed_time(end), torch.cuda.max_memory_allocated() - base
        else:
            ms, peak = (time.perf_counter() - t0) * 1e3, meter.stop()
        peaks.append(peak)
        if i > 0:
            times.append(ms)
    mem_how = "cuda.max_memory_allocated" if cuda else ("VmHWM" if meter.hwm else "statm sampling")
    print(json.dumps(dict(peak_mib=max(peaks) / MIB, ms=statistics.median(times), mem_how=mem_how)))


def child_cmd(a, method, t):
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--cell",
        method,
        "--tokens",
        str(t),
        "--repeats",
        str(a.repeats),
        "--vocab",
        str(a.vocab),
        "--teacher-extra-vocab",
        str(a.teacher_extra_vocab),
        "--student-hidden",
        str(a.student_hidden),
        "--teacher-hidden",
        str(a.teacher_hidden),
        "--chunk-size",
        str(a.chunk_size),
        "--device",
        a.device,
        "--mem-limit-gib",
        str(a.mem_limit_gib),
    ]
    return cmd + (["--threads", str(a.threads)] if a.threads else [])


def main():
    a = parse_args()
    if a.repeats < 1:
        sys.exit("--repeats must be >= 1")
    if a.cell:
        return run_cell(a)
    dev_name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    print(
        f"device: {dev_name}; torch {torch.__version__}; dtype {dtype_for(a.device)}; "
        f"vocab {a.vocab} (teacher {a.vocab + a.teacher_extra_vocab}); hidden {a.student_hidden} / "
        f"{a.teacher_hidden}; chunk {a.chunk_size}; repeats {a.repeats} (+1 warm-up); "
        f"mem limit {a.mem_limit_gib:.1f} GiB\n"
    )
    print("| method | tokens | peak extra MiB | median ms |\n|---|---:|---:|---:|", flush=True)
    how = set()
    for t in a.tokens:
        for m in a.methods:
            est = estimate_bytes(m, t, a)
            if est > a.mem_limit_gib * GIB:
                print(f"| {m} | {t} | OOM (est. {est / GIB:.1f} GiB) | - |", flush=True)
                continue
            r = subprocess.run(child_cmd(a, m, t), capture_output=True, text=True)
            if r.returncode != 0:
                err = (r.stderr.strip().splitlines() or ["?"])[-1][:80]
                print(f"| {m} | {t} | failed (rc {r.returncode}: {err}) | - |", flush=True)
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            how.add(res["mem_how"])
            print(f"| {m} | {t} | {res['peak_mib']:.0f} | {res['ms']:.1f} |", flush=True)
    print(f"\npeak memory from: {', '.join(sorted(how)) or '-'}; time: median of {a.repeats} after 1 warm-up")


if __name__ == "__main__":
    main()
