"""``zeroserve dev``: Knative's activator and autoscaler in miniature, for one machine and no cluster.

It holds a port, starts model server processes (``python -m zeroserve.runtime``) when requests come, holds
requests while a process starts, and stops processes that stay idle. It never imports the server: it only
starts it and speaks HTTP to it.
"""
