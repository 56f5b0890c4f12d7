# In L2 (nesting on): a ticker L3 guest that keeps running a while; the level
# above does things to L2 meanwhile.
say "ticker starting"
vm l3ticker 900 --kernel /guests/ticker.elf --memory 16M
check l2-ticker-l3-exit-0 rc_is l3ticker 0
check l3-ticker-finished logged l3ticker "LAB-TINY: ticker done"
