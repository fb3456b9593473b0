"""``labsync try-order``: ask the LIS about one order and show what labsync would write.

(Being built for the mapped adapter's issue; the command is not wired yet.)
"""
