# In L2 (nesting on): a ticker L3 guest that keeps running about a minute,
# far longer than what the level above does to L2 meanwhile takes.
say "ticker starting"
vm l3ticker 900 --kernel /guests/ticker-long.elf --memory 16M
check l2-ticker-l3-exit-0 rc_is l3ticker 0
check l3-ticker-finished logged l3ticker "LAB-TINY: long ticker done"
