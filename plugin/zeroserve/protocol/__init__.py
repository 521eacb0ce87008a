"""Open Inference Protocol (KServe V2) pieces shared by the client and the server.

Nothing here imports numpy at module import time; functions that need it import it inside.
"""
