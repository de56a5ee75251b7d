"""nf4-explorer's tuner: search drivers, timing, the tuned-file writer and the command line.

The runtime (``variants``) never imports this package.
"""
