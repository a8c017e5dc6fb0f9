"""flower_tutorial.deployment: operations tooling, apart from the app itself.

Neither the ServerApp nor the ClientApp imports this package. It starts and stops
a local deployment (``python -m flower_tutorial.deployment start|stop``, local.py)
and makes TLS certificates and SuperNode keys
(``python -m flower_tutorial.deployment.security``, security.py).
"""
