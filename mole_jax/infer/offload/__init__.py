"""Offloaded inference: the engines that read MoLE lookup-table rows or MoE experts from their
stores on demand, the host-side row cache and prefetcher, expert-cache replacement policies, the
backbone's pieces jitted one at a time (`staged`), and Read-ME's pre-gated lookahead engine with
its request scheduling and serving loop.
"""
