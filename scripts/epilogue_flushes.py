#!/usr/bin/env python3
"""Column-sum flushes and epilogue-walk barriers of a training step, from `wrnc compile --emit schedule`.

    wrnc compile NET --emit schedule [--precision ...] > s.json; python3 scripts/epilogue_flushes.py s.json LABEL

Design counts from the schedule (tiles, grids, channels), not measurements."""
import json,sys
# Column-sum flushes (each: two atomic sums) and walk barriers per training step, before
# (one flush per 16 rows of a tile column; two barriers per 16x16 sub-tile) and after this
# change (one flush per tile column; two barriers per 16 columns in NHWC, none in NCHW).
s=json.load(open(sys.argv[1]))
K=s['kernels']
tot={'old_fl':0,'new_fl':0,'old_bar':0,'new_bar':0,'launches':0}
for l in s['launches']:
    sp=K[l['kernel']]['spec']
    kind=sp['kind']
    if kind=='conv_fwd' and sp.get('epi',{}).get('stats') and sp.get('split_k',1)<=1:
        sc=[x for x in l['scalars']]; nc=list(sc[2].values())[0]//sp['g'].get('groups',1)
    elif kind=='conv_bwd_data' and any(sp.get('chain',{}).values()):
        sc=[x for x in l['scalars']]; nc=list(sc[1].values())[0]//sp['g'].get('groups',1)
    else: continue
    t=sp['g'].get('tile',{'rows':64,'cols':64}); r,c=t['rows'],t['cols']
    gx,gy,gz=l['grid']
    nh=sp['g'].get('nhwc',False)
    tot['launches']+=1
    tot['old_fl']+=gx*(r//16)*nc*gz
    tot['new_fl']+=gx*nc*gz
    blocks=gx*gy*gz
    tot['old_bar']+=blocks*2*(r//16)*(c//16)
    tot['new_bar']+=blocks*(2*(c//16) if nh else 0)
print(sys.argv[2], tot, "flush ratio %.1f"%(tot['old_fl']/max(1,tot['new_fl'])))
