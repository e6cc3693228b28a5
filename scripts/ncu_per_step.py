#!/usr/bin/env python3
"""GPU time and launches per decode step from two `ncu --print-summary per-kernel --metrics
gpu__time_duration.sum` reports of `bench`: one with STEPS decode steps, one with none (the set-up
and the prompt, subtracted). Usage: ncu_per_step.py WITH_STEPS.txt WITHOUT.txt STEPS"""
import re,sys,collections
def parse(f):
    d=collections.defaultdict(lambda:[0,0.0]); name=None
    for line in open(f):
        m=re.match(r'  (\S+) \((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\).*Invocations (\d+)',line)
        if m: name=m.group(1)+" "+"(%s,%s,%s)x(%s,%s,%s)"%m.groups()[1:7]; inv=int(m.group(8)); continue
        m=re.match(r'\s+gpu__time_duration.sum\s+(\S+)\s+\S+\s+\S+\s+(\S+)',line)
        if m and name:
            unit,avg=m.group(1),float(m.group(2).replace(',',''))
            s={'ns':1e-3,'us':1,'usecond':1,'ms':1e3,'msecond':1e3,'nsecond':1e-3}[unit]
            d[name][0]+=inv; d[name][1]+=inv*avg*s; name=None
    return d
a=parse(sys.argv[1]); b=parse(sys.argv[2]); steps=int(sys.argv[3])
rows=[]
for k in set(a)|set(b):
    n=a[k][0]-b[k][0]; t=a[k][1]-b[k][1]
    if n>0: rows.append((t/steps,n/steps,k))
rows.sort(reverse=True)
tot=sum(r[0] for r in rows); cnt=sum(r[1] for r in rows)
print("per step: %.1f us GPU, %.1f launches"%(tot,cnt))
for t,n,k in rows[:40]: print("%8.1f us %6.1f  %s"%(t,n,k[:150]))
