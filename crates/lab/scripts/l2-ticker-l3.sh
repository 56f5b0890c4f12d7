# In L2 (nesting on): a ticker L3 guest that keeps running about a minute,
# far longer than what the level above does to L2 meanwhile takes. Its
# console stays off L2's (see vm_quiet): the level above reads and writes
# back L2's vCPU state meanwhile, and wants to find it running L3.
say "ticker starting"
( wait_for /tmp/l3ticker.log '\.\.\.' 600 && say "l3 is ticking" ) &
vm_quiet l3ticker 900 --kernel /guests/ticker-long.elf --memory 16M
wait
check l2-ticker-l3-exit-0 rc_is l3ticker 0
check l3-ticker-finished logged l3ticker "LAB-TINY: long ticker done"
say "l3-ticks=$(sed -n 's/^\(\.*\)LAB-TINY: long ticker done.*/\1/p' /tmp/l3ticker.log | tr -d '\n' | wc -c)"
