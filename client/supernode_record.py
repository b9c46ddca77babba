"""Where the hospital daemon records how it last started the site's SuperNode (read by the health check).

Kept free of heavy imports: ``fedtl-hospital start`` must not load torch before it execs the SuperNode.
"""

DAEMON_RECORD = "supernode.json"
"""File name, in the site's state directory, of the daemon's record (command, ports, settings; no secrets)."""
