"""Sample the resident memory of every python process on this host every 0.5 s until SIGTERM;
then print, as JSON, the peak of their sum, the largest one's peak, the most processes seen, and
every fourth sample (seconds, processes, GiB).

Usage: python benchmarks/host_memory.py > OUT.json &  (run the command to watch)  kill -TERM $!
It wrote benchmarks/results/compile-ahead-memory-h200.json around
`dkbench run sweeps/phi3.yaml --only seqlen=8192` on a fresh H200 machine at 13f4778.
"""
import json
import os
import signal
import sys
import time

peak_total = 0; peak_one = 0; peak_n = 0; samples = []
def rss():
    out = {}
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = open(f'/proc/{pid}/cmdline','rb').read().split(b'\0')[0]
            if b'python' not in cmd:
                continue
            for line in open(f'/proc/{pid}/status'):
                if line.startswith('VmRSS:'):
                    out[pid] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out
def done(*_):
    print(json.dumps({"peak_total_gib": peak_total / 2**30, "peak_one_gib": peak_one / 2**30,
                      "peak_processes": peak_n, "trace": samples[::4]}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
t0 = time.time()
while True:
    r = rss(); tot = sum(r.values())
    peak_total = max(peak_total, tot); peak_n = max(peak_n, len(r))
    peak_one = max([peak_one, *r.values()])
    samples.append((round(time.time() - t0, 1), len(r), round(tot / 2**30, 1)))
    time.sleep(0.5)
