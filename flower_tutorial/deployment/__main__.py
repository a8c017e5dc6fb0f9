"""``python -m flower_tutorial.deployment start|stop``: see local.py."""

from flower_tutorial.deployment.local import main

main()
